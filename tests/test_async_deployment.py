"""Buffered asynchronous aggregation on loopback: `fedtide server --buffer-size 1` (a SuperLink)
and two `fedtide client` processes (SuperNodes), all real processes. One client becomes slow
(its training process is stopped): the server keeps updating the global model from the other
one, and when the slow client's reply finally arrives it is aggregated, weighted as stale."""

from __future__ import annotations

import json
import signal

import pytest

from fedtide.cli import main
from loopback import Session, digits_arrays, drop_file, free_port, wait_for

pytestmark = pytest.mark.slow

UPDATES = 10  # the run's rounds: each one asynchronous update


def _records(run) -> list[dict]:
    metrics = run / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


def test_an_asynchronous_server_goes_on_without_a_slow_client_and_weighs_its_late_reply(tmp_path):
    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--server-name", "localhost", "--nodes", "2"]) == 0
    data = [tmp_path / "data-1", tmp_path / "data-2"]
    for i, folder in enumerate(data):
        drop_file(folder, "batch-0.npz", *digits_arrays(seed=i, count=100))
    run = tmp_path / "run"
    address = f"127.0.0.1:{free_port()}"
    sessions: list[Session] = []
    try:
        server = Session(
            ["server", "--certs", str(certs), "--database", str(tmp_path / "superlink.db"), "--out", str(run),
             "--address", address, "--num-tasks", "1", "--rounds-per-task", str(UPDATES), "--local-epochs", "1",
             "--buffer-size", "1", "--concurrency", "2", "--round-timeout", "120"],
            tmp_path / "server.log", tmp_path,
        )
        sessions.append(server)
        for i in range(2):
            sessions.append(Session(
                ["client", "--server", address, "--certs", str(certs), "--node-key", str(certs / f"node-{i + 1}.key"),
                 "--data", str(data[i]), "--state", str(tmp_path / f"state-{i + 1}")],
                tmp_path / f"client-{i + 1}.log", tmp_path,
            ))
        slow = sessions[2]
        wait_for(lambda: len(_records(run)) >= 1, 180, "the first update")
        # node-2 is now very slow: its training processes are stopped, each new one as it starts
        wait_for(lambda: slow.signal_clientapps(signal.SIGSTOP) >= 1, 120, "node-2 training", every=0.05)
        frozen_at = len(_records(run))
        wait_for(lambda: slow.signal_clientapps(signal.SIGSTOP) >= 0 and len(_records(run)) >= frozen_at + 4, 120,
                 "updates while node-2 is slow", every=0.05)
        assert slow.signal_clientapps(signal.SIGCONT) >= 1
        assert server.wait(timeout=300) == 0, server.output()[-3000:]
    finally:
        for session in sessions:
            session.kill()

    records = _records(run)
    assert [r["round"] for r in records] == list(range(1, UPDATES + 1))
    # node-2's late reply came from a model 3+ updates old, which node-1 alone had moved on
    late = next(i for i, r in enumerate(records) if i >= frozen_at
                and any(c["name"] == "node-2" and c["staleness"] >= 3 for c in r["clients"]))
    assert {c["name"] for r in records[late - 3:late] for c in r["clients"]} == {"node-1"}
    assert all(c["staleness"] <= 1 for r in records for c in r["clients"] if c["name"] == "node-1")
