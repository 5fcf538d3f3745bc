"""Releases on loopback: `fedtide server` (a SuperLink) and two `fedtide client` processes
(SuperNodes), all real processes, the clients sending compressed updates. The edge clients receive the released model and keep it;
an operator rolls back with `fedtide models rollback` while the server runs, and from the next
round the clients hold the earlier version, bit-exact; `fedtide predict` answers with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.released_model import ReleasedModelStore
from common.weights import weights_digest
from fedtide.cli import main
from loopback import Session, digits_arrays, drop_file, free_port, wait_for
from server.model_registry import ModelRegistry
from test_prometheus import _scrape

pytestmark = pytest.mark.slow

ROUNDS = 7


def _records(run) -> list[dict]:
    metrics = run / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


def test_clients_hold_the_released_model_and_a_live_rollback_reaches_them_bit_exact(tmp_path, capsys):
    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--server-name", "localhost", "--nodes", "2"]) == 0
    data = [tmp_path / "data-1", tmp_path / "data-2"]
    state = [tmp_path / "state-1", tmp_path / "state-2"]
    for i, folder in enumerate(data):
        drop_file(folder, "batch-0.npz", *digits_arrays(seed=i, count=120))
    run = tmp_path / "run"
    address, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    sessions: list[Session] = []
    try:
        server = Session(
            ["server", "--certs", str(certs), "--database", str(tmp_path / "superlink.db"), "--out", str(run),
             "--address", address, "--num-tasks", "1", "--rounds-per-task", str(ROUNDS), "--local-epochs", "1",
             "--round-timeout", "120", "--release", "every-round", "--metrics-address", f"127.0.0.1:{metrics_port}",
             "--compress", "int8"],  # the edge clients send packed updates, their residuals on disk
            tmp_path / "server.log", tmp_path,
        )
        sessions.append(server)
        for i in range(2):
            sessions.append(Session(
                ["client", "--server", address, "--certs", str(certs), "--node-key", str(certs / f"node-{i + 1}.key"),
                 "--data", str(data[i]), "--state", str(state[i])],
                tmp_path / f"client-{i + 1}.log", tmp_path,
            ))
        wait_for(lambda: len(_records(run)) >= 3, 240, "three rounds")
        scraped = _scrape(metrics_port)  # the ServerApp's process serves them while it runs
        assert scraped[("fedtide_round", ())] >= 3 and scraped[("fedtide_nodes", (("state", "connected"),))] == 2
        assert scraped[("fedtide_released_version", ())] >= 2
        drop_file(data[0], "batch-1.npz", *digits_arrays(seed=9, count=60))  # predicted by the model held, then learned
        assert main(["models", "rollback", str(run), "--to", "1", "--note", "test"]) == 0
        rolled_back_after = len(_records(run))
        assert server.wait(timeout=400) == 0, server.output()[-3000:]
    finally:
        for session in sessions:
            session.kill()

    records = _records(run)
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    assert rolled_back_after <= ROUNDS - 2  # a later round served the rollback
    assert all(r["release"]["released"] == 1 for r in records[rolled_back_after + 1:])  # releases paused
    with ModelRegistry(run).open() as registry:
        first = registry.version(1)
        assert registry.released == 1 and not registry.auto
    for folder in state:
        held = ReleasedModelStore(folder).load()
        assert held.version == 1 and held.sha256 == first["sha256"]
        assert weights_digest(held.model.state_dict()) == first["sha256"]  # bit-exact, as loaded for predictions
    versions = {c["name"]: c["released-version"] for c in records[-1]["clients"]}
    assert versions == {"node-1": 1, "node-2": 1}
    judged = [c["released-acc"] for r in records for c in r["clients"] if "released-acc" in c]
    assert len(judged) == 1  # node-1's new file, predicted by the model it held before learning from it
    stats = ReleasedModelStore(state[0]).stats()
    assert [entry["seen"] for entry in stats.values()] == [60]
    assert [entry["correct"] / entry["seen"] for entry in stats.values()] == pytest.approx(judged)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["rejected_replies"] == 0
    assert summary["uplink_bytes_per_client_round"] < summary["downlink_bytes_per_client_round"] / 3

    x, y = digits_arrays(seed=5, count=30)
    np.savez(tmp_path / "ask.npz", x=x, y=y)
    capsys.readouterr()
    assert main(["predict", "--state", str(state[0]), str(tmp_path / "ask.npz")]) == 0
    printed = capsys.readouterr()
    assert "version 1" in printed.err and len(printed.out.splitlines()) == 31
