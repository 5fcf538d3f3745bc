"""Differential privacy on loopback: a real `fedtide server` (SuperLink, TLS, node
authentication) and two `fedtide client` processes (SuperNodes) training with DP-SGD, sending
int4-compressed updates and receiving the model packed (int8). Each device's budget is in its
privacy ledger; a second server run starts the devices' state fresh and reads their files
again, and their budget counts on. A third run uses client-level DP on the same packed
updates."""

from __future__ import annotations

import json

import pytest

from client.privacy_ledger import PrivacyLedger
from fedtide.cli import main
from loopback import Session, digits_arrays, drop_file, free_port

pytestmark = pytest.mark.slow


def _run(tmp_path, certs, name: str, rounds: int, dp: str = "sample") -> dict:
    address = f"127.0.0.1:{free_port()}"
    run = tmp_path / name
    sessions: list[Session] = []
    try:
        server = Session(
            ["server", "--certs", str(certs), "--database", str(tmp_path / f"{name}.db"), "--out", str(run),
             "--address", address, "--num-tasks", "1", "--rounds-per-task", str(rounds), "--local-epochs", "1",
             "--round-timeout", "120", "--release", "manual", "--dp", dp, "--dp-noise", "1.0",
             "--compress", "int4", "--compress-down", "int8"],
            tmp_path / f"{name}-server.log", tmp_path,
        )
        sessions.append(server)
        for i in (1, 2):
            sessions.append(Session(
                ["client", "--server", address, "--certs", str(certs), "--node-key", str(certs / f"node-{i}.key"),
                 "--data", str(tmp_path / f"data-{i}"), "--state", str(tmp_path / f"state-{i}")],
                tmp_path / f"{name}-client-{i}.log", tmp_path,
            ))
        assert server.wait(timeout=400) == 0, server.output()[-3000:]
    finally:
        for session in sessions:
            session.kill()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, "summary": json.loads((run / "summary.json").read_text())}


def _epsilons(records: list[dict]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for record in records:
        for client in record["clients"]:
            out.setdefault(client["name"], []).append(client["dp-epsilon"])
    return out


def test_devices_train_privately_send_packed_updates_and_their_budget_outlives_a_run(tmp_path):
    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--server-name", "localhost", "--nodes", "2"]) == 0
    for i in (1, 2):
        drop_file(tmp_path / f"data-{i}", "batch-0.npz", *digits_arrays(seed=i, count=120))

    first = _run(tmp_path, certs, "run-1", rounds=2)
    second = _run(tmp_path, certs, "run-2", rounds=1)

    for result in (first, second):
        summary = result["summary"]
        assert summary["rejected_replies"] == 0 and summary["dp"]["level"] == "sample"
        model = summary["bytes_per_client_round"] / 2  # the model's float32 bytes, one way
        assert summary["uplink_bytes_per_client_round"] < model / 6 and summary["downlink_bytes_per_client_round"] < model / 3.5
    before, after = _epsilons(first["records"]), _epsilons(second["records"])
    assert set(before) == set(after) == {"node-1", "node-2"}
    for node in before:
        assert before[node] == sorted(before[node]) and before[node][0] > 0
        assert after[node][0] > before[node][-1]  # the same files again, in a new run: the budget counts on
    assert second["summary"]["dp"]["epsilon"] == pytest.approx(max(e for es in after.values() for e in es))
    for i in (1, 2):  # three rounds of DP-SGD in each device's ledger
        spent = PrivacyLedger(tmp_path / f"state-{i}").load()
        assert spent is not None and spent[:, 2].sum() > 0

    # client-level DP composes with the packed updates too: unpacked, clipped and noised on the server
    client_level = _run(tmp_path, certs, "run-3", rounds=1, dp="client")["summary"]
    assert client_level["rejected_replies"] == 0 and client_level["dp"]["level"] == "client"
    assert client_level["dp"]["epsilon"] > 0 and client_level["dp"]["rounds"] == 1
