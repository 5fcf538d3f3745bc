"""What a SuperNode sends and receives through Flower's Fleet API, per call, on the wire.

Flower 1.42's SuperNode talks to the SuperLink in protobuf over HTTP/1.1 (TLS around it),
through ``FleetHttpClient``, whose interceptors see every request as it is sent and every
response as it comes back. ``WireMeter`` is such an interceptor, placed innermost (after
Flower's node authentication has signed the request): it counts each call's bytes as HTTP
frames them, the request line, headers and body up, the status line, headers and body down,
per RPC. An empty ``PullMessages`` (a poll that found nothing) is counted apart from one that
brought a message. TLS adds its records around these bytes (a few tens of bytes per 16 KB).

Turned on by ``FEDTIDE_WIRE_LOG=PATH`` in the environment of ``fedtide client``: the counts so
far are written to PATH (JSON, replaced atomically) after every call. ``benchmarks/wire_bytes.py``
reads them to set the bytes on the wire beside the bench's figure.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

ENV = "FEDTIDE_WIRE_LOG"
EMPTY_POLL = "PullMessages (empty)"
EMPTY_BODY_BYTES = 16  # a PullMessagesResponse this small carries no message


def _line_and_headers(first_line: str, headers: Any) -> int:
    """HTTP/1.1: the first line and each header as ``name: value`` with CRLFs, then a blank line."""
    return len(first_line) + 2 + sum(len(name) + 2 + len(value) + 2 for name, value in headers.raw) + 2


def request_bytes(request: Any) -> int:
    return _line_and_headers(f"{request.method} {request.url.raw_path.decode()} HTTP/1.1", request.headers) + len(
        request.content)


def response_bytes(response: Any) -> int:
    body = len(response.content)
    return _line_and_headers(f"HTTP/1.1 {response.status_code} {response.reason_phrase}", response.headers) + body


class WireMeter:
    """A ``ProtobufClientInterceptor`` that counts calls and bytes per RPC, written to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts: dict[str, dict[str, int]] = {}
        self.lock = threading.Lock()
        self.failed = False

    def intercept(self, context: Any, call_next: Any) -> Any:
        up = request_bytes(context.request)
        response = call_next(context)
        response.read()
        name = context.rpc_method.rsplit("/", 1)[-1]
        if name == "PullMessages" and len(response.content) <= EMPTY_BODY_BYTES:
            name = EMPTY_POLL
        with self.lock:
            entry = self.counts.setdefault(name, {"calls": 0, "up": 0, "down": 0})
            entry["calls"] += 1
            entry["up"] += up
            entry["down"] += response_bytes(response)
            self._write()
        return response

    def _write(self) -> None:
        """The counts so far; a log that cannot be written is given up with one warning (the
        call it counts already reached the SuperLink and must not look failed)."""
        if self.failed:
            return
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(self.counts))
            os.replace(temporary, self.path)
        except OSError as err:
            self.failed = True
            logging.getLogger("fedtide").warning("%s=%s cannot be written (%s): the wire is not counted", ENV,
                                                 self.path, err)


def install_from_environment() -> bool:
    """With ``FEDTIDE_WIRE_LOG`` set: every Fleet API client Flower makes in this process gets
    a ``WireMeter`` as its innermost interceptor. False when it is not set, or this Flower
    has no ``FleetHttpClient`` (then nothing is counted)."""
    target = os.environ.get(ENV)
    if not target:
        return False
    try:
        from flwr.supernode.fleet_http_client import FleetHttpClient
    except ImportError:
        return False
    meter = WireMeter(Path(target))
    original = FleetHttpClient.from_server_address.__func__

    def metered(cls, server_address, insecure, root_certificates, interceptors, **kwargs):
        return original(cls, server_address, insecure, root_certificates, [*interceptors, meter], **kwargs)

    FleetHttpClient.from_server_address = classmethod(metered)
    return True
