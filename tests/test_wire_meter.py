"""The wire meter (fedtide/deployment/wire_meter.py): a SuperNode's Fleet API calls counted as
HTTP/1.1 frames them, per RPC, written where FEDTIDE_WIRE_LOG says."""

from __future__ import annotations

import json

import h11
import httpx
from flwr.supernode.fleet_http_client import FleetHttpClient

from fedtide.deployment.wire_meter import EMPTY_POLL, ENV, WireMeter, install_from_environment


def _h11_bytes(request: httpx.Request) -> int:
    """The request as h11 (httpx's HTTP/1.1 writer) puts it on the wire."""
    connection = h11.Connection(h11.CLIENT)
    head = connection.send(h11.Request(method=request.method, target=request.url.raw_path,
                                       headers=list(request.headers.raw)))
    body = connection.send(h11.Data(data=request.content))
    end = connection.send(h11.EndOfMessage())
    return len(head) + len(body) + len(end)


class _Context:
    def __init__(self, rpc: str, request: httpx.Request) -> None:
        self.rpc_method, self.request = rpc, request


def test_each_call_is_counted_as_http_writes_it_per_rpc(tmp_path):
    log = tmp_path / "wire.json"
    meter = WireMeter(log)
    client = httpx.Client()
    request = client.build_request("POST", "https://superlink:9092/flwr.proto.Fleet/PushObject", content=b"\x01" * 5000,
                                   headers={"x-signature": "s" * 120})
    answer = httpx.Response(200, content=b"ok", request=request)
    assert meter.intercept(_Context("/flwr.proto.Fleet/PushObject", request), lambda _: answer) is answer
    empty = httpx.Response(200, content=b"", request=request)
    meter.intercept(_Context("/flwr.proto.Fleet/PullMessages", request), lambda _: empty)
    counts = json.loads(log.read_text())
    assert counts["PushObject"]["calls"] == 1 and counts["PushObject"]["up"] == _h11_bytes(request)
    assert counts["PushObject"]["down"] > len(b"ok")  # the status line and headers too
    assert counts[EMPTY_POLL]["calls"] == 1 and "PullMessages" not in counts


def test_the_environment_puts_the_meter_innermost_in_flowers_fleet_client(tmp_path, monkeypatch):
    assert "from_server_address" not in FleetHttpClient.__dict__  # inherited from Flower's ProtobufClient
    monkeypatch.setenv(ENV, str(tmp_path / "wire.json"))
    try:
        assert install_from_environment()
        outer = object()
        with FleetHttpClient.from_server_address("127.0.0.1:9", True, None, interceptors=[outer]) as client:
            assert client._interceptors[0] is outer and isinstance(client._interceptors[-1], WireMeter)
    finally:
        del FleetHttpClient.from_server_address  # back to the inherited one
    monkeypatch.delenv(ENV)
    assert not install_from_environment()


def test_a_log_that_cannot_be_written_never_fails_the_call_it_counts(tmp_path):
    meter = WireMeter(tmp_path / "missing-folder" / "wire.json")
    request = httpx.Client().build_request("POST", "https://superlink:9092/flwr.proto.Fleet/PushMessages", content=b"x")
    answer = httpx.Response(200, content=b"ok", request=request)
    assert meter.intercept(_Context("/flwr.proto.Fleet/PushMessages", request), lambda _: answer) is answer
    assert meter.failed and meter.counts["PushMessages"]["calls"] == 1
