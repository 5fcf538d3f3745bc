"""``fedtide predict --serve HOST:PORT``: the released model's predictions over local HTTP.

``POST /predict`` takes one file's bytes (``.npz`` or ``.csv``, named by the ``X-Filename``
header; at most 64 MiB, read with the inbox's checks) and answers JSON: the model's version
and sha256, the predictions, and the accuracy when the file has labels. ``GET /model`` says
which version answers. A bad request gets a 4xx with the reason; the server goes on. It binds
to loopback unless told otherwise, answers one request at a time (a device serves itself), and
answers with the model the device holds now: a new release or a rollback it receives is used
from the next request on.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from common.addresses import parse_address
from common.errors import FedtideError
from fedtide.predict_command import MAX_BODY, predict_bytes


class FollowReleases:
    """The model a device holds now: loaded again when a new release (or a rollback) replaced
    it in the state folder; the last good one answers while a new file cannot be read."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.current = store.load()

    def __call__(self) -> Any:
        version, sha256 = self.store.held()
        if version and (version, sha256) != (self.current.version, self.current.sha256):
            try:
                self.current = self.store.load()
            except FedtideError:
                pass
        return self.current


def make_server(address: str, released: Any, feature_range: tuple[float, float]) -> HTTPServer:
    """The HTTP server (not yet serving); FedtideError when the address cannot be bound.
    ``released``: the model, or a callable that gives the one to answer with (``FollowReleases``)."""
    current = released if callable(released) else (lambda: released)

    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # one request at a time: a connection that stalls must not hold the device's endpoint

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != "/model":
                self._answer(404, {"error": "GET /model or POST /predict"})
                return
            model = current()
            self._answer(200, {"version": model.version, "sha256": model.sha256})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/predict":
                self._answer(404, {"error": "POST /predict"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._answer(411, {"error": "send a Content-Length"})
                return
            if not 0 < length <= MAX_BODY:
                self._answer(413, {"error": f"the body must hold 1 byte to {MAX_BODY // 2**20} MiB"})
                return
            name = str(self.headers.get("X-Filename", "samples.npz"))[:200]
            raw = self.rfile.read(length)
            try:
                self._answer(200, predict_bytes(current(), name, raw, feature_range))
            except FedtideError as err:
                self._answer(400, {"error": str(err)})

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the device's log is for rounds
            pass

    host, port = parse_address(address, "--serve", "127.0.0.1:8500")
    try:
        return HTTPServer((host, port), Handler)
    except OSError as err:
        raise FedtideError(f"--serve {address}: cannot listen there ({err.strerror or err})") from None


def serve(address: str, store: Any, feature_range: tuple[float, float]) -> None:
    """Answer with the model ``store`` (a ``ReleasedModelStore``) holds, following its releases."""
    follow = FollowReleases(store)
    server = make_server(address, follow, feature_range)
    host, port = server.server_address[:2]
    print(f"fedtide predict: version {follow.current.version} answers on http://{host}:{port}/predict (it follows "
          "the releases this device receives)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
