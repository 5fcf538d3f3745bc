"""A live status page of a run (``--serve HOST:PORT``): what an operator opens in a browser.

The process that runs the rounds serves, read-only:
- ``GET /``: one self-contained HTML page (no external script, style or font): the run's
  settings, a chart of the global model's accuracy per task over rounds with task switches
  and drift events marked, a table of nodes (last seen, replies, rejects, drift, task) and the
  released model version. The page asks for ``/api/status`` twice a second and redraws when a
  round ended, so it follows the run without a reload;
- ``GET /api/status``: the same as JSON (``?since=R`` leaves out rounds up to R).

It binds to loopback unless given another host (``--serve 0.0.0.0:8080`` shows the run to the
network: the page holds the run's settings and node names, nothing a client sent). A port in
use stops the run before any round. Node names and reasons are escaped by the page (set as
text, never as HTML): a client cannot inject markup.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlparse

from common.addresses import parse_address
from common.errors import FedtideError
from server.history import RoundRecord

MAX_NODES_SHOWN = 500  # the table lists the most recently seen nodes first


class RunStatus:
    """What the page shows, kept from the rounds as they end (thread-safe)."""

    def __init__(self, settings: dict[str, Any], num_rounds: int, num_tasks: int) -> None:
        self.lock = threading.Lock()
        self.settings = settings
        self.num_rounds = num_rounds
        self.num_tasks = num_tasks
        self.rounds: list[dict[str, Any]] = []
        self.nodes: dict[str, dict[str, Any]] = {}
        self.released: int | None = None
        self.finished = False

    def add(self, record: RoundRecord, connected: int | None = None) -> None:
        line = record.as_json()
        drifting = [c for c in record.clients if c.get("drift-detected")]
        entry = {
            "round": record.server_round, "task": record.task, "accuracies": record.task_accuracies,
            "seen": line["accuracy_seen_tasks"], "drift": len(drifting), "replied": len(record.clients),
            "rejected": len(record.rejected), "seconds": record.seconds, "connected": connected,
            "released": record.release.get("released"), "new_release": "release" in record.release,
            "ended": time.time(),
        }
        with self.lock:
            self.rounds.append(entry)
            self.released = entry["released"] if entry["released"] is not None else self.released
            for client in record.clients:
                node = self._node(client)
                node["replies"] += 1
                node["drift"] += int(bool(client.get("drift-detected")))
                if "task-id" in client:
                    node["task"] = client["task-id"]
                node["last_seen"] = record.server_round
            for reject in record.rejected:
                node = self._node(reject)
                node["rejects"] += 1
                node["last_seen"] = record.server_round
                node["last_reject"] = str(reject.get("reason", ""))[:200]

    def _node(self, entry: dict[str, Any]) -> dict[str, Any]:
        key = str(entry.get("node", "?"))
        return self.nodes.setdefault(key, {"node": key, "name": str(entry.get("name", ""))[:64], "replies": 0,
                                           "rejects": 0, "drift": 0, "task": None, "last_seen": 0})

    def as_json(self, since: int = 0) -> dict[str, Any]:
        with self.lock:
            nodes = sorted(self.nodes.values(), key=lambda n: (-n["last_seen"], n["node"]))[:MAX_NODES_SHOWN]
            return {
                "settings": self.settings, "num_rounds": self.num_rounds, "num_tasks": self.num_tasks,
                "rounds": [r for r in self.rounds if r["round"] > since], "last_round": self.rounds[-1]["round"]
                if self.rounds else 0, "nodes": nodes, "node_count": len(self.nodes), "released": self.released,
                "finished": self.finished,
            }


class StatusPage:
    """The page and its JSON, served from a thread until ``close``."""

    def __init__(self, address: str, settings: dict[str, Any], num_rounds: int, num_tasks: int,
                 earlier: list[RoundRecord] = ()) -> None:
        # a tracking URI may hold credentials: the page shows that one is set, not what it is
        shown = {k: ("(set)" if "uri" in k and v else v) for k, v in settings.items()}
        self.status = RunStatus(shown, num_rounds, num_tasks)
        for record in earlier:  # a resumed run shows its rounds so far
            self.status.add(record)
        page = resources.files("server").joinpath("status_page.html").read_bytes()
        status = self.status

        class Handler(BaseHTTPRequestHandler):
            timeout = 30  # a connection that sends nothing is closed, not kept open forever

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; "
                                 "script-src 'unsafe-inline'")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlparse(self.path)
                if url.path == "/":
                    self._send(200, page, "text/html; charset=utf-8")
                elif url.path == "/api/status":
                    try:
                        since = int(parse_qs(url.query).get("since", ["0"])[0])
                    except ValueError:
                        since = 0
                    self._send(200, json.dumps(status.as_json(since)).encode(), "application/json")
                else:
                    self._send(404, b'{"error": "GET / or /api/status"}', "application/json")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        host, port = parse_address(address, "--serve", "127.0.0.1:8080", port_alone=True)
        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise FedtideError(f"--serve {address}: cannot listen there ({err.strerror or err}): choose another port") from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fedtide-status-page", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def round_done(self, record: RoundRecord, connected: int | None) -> None:
        self.status.add(record, connected)

    def close(self) -> None:
        self.status.finished = True
        self.server.shutdown()
        self.server.server_close()
