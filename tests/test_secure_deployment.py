"""Secure aggregation on loopback: a real `fedtide server --secure-aggregation` (SuperLink, TLS,
node authentication) and four `fedtide client` processes (SuperNodes) with their own files,
training with DP-SGD (sample-level DP composes: each device accounts its own budget).
Every round runs SecAgg+'s four stages through Flower's own message path. Round 1's model is
the plain weighted mean of the four devices' models within quantisation error (each device's
round replayed here, in the clear, from its files); one client is killed outright in the
middle of round 2's protocol, and that round and the next still aggregate the others
(``--min-clients 3``: the run does not wait for it to come back)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from safetensors.numpy import load_file

from client.app import train_message
from common.config import RunConfig
from common.models import build_model
from common.scenarios import build_scenario
from fedtide.cli import main
from fedtide.runtimes.inprocess import InProcessGrid
from loopback import Session, digits_arrays, drop_file, free_port, wait_for
from server.federation import client_config

pytestmark = pytest.mark.slow

CLIENTS = 4
ROUNDS = 3
ROUND_TIMEOUT = 60  # key stages wait a quarter of it for a client that is gone


def _completed_rounds(run) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_four_devices_aggregate_securely_and_a_client_killed_mid_protocol_does_not_stall_the_run(tmp_path):
    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--server-name", "localhost", "--nodes", str(CLIENTS)]) == 0
    for i in range(CLIENTS):
        drop_file(tmp_path / f"data-{i}", "batch-0.npz", *digits_arrays(seed=i, count=100 + 10 * i))
    run = tmp_path / "run"
    address = f"127.0.0.1:{free_port()}"
    sessions: list[Session] = []
    try:
        server = Session(
            ["server", "--certs", str(certs), "--database", str(tmp_path / "superlink.db"), "--out", str(run),
             "--address", address, "--num-tasks", "1", "--rounds-per-task", str(ROUNDS), "--local-epochs", "1",
             "--round-timeout", str(ROUND_TIMEOUT), "--release", "manual", "--secure-aggregation",
             "--secure-max-weight", "500", "--min-clients", str(CLIENTS - 1),
             "--dp", "sample", "--dp-noise", "1.0", "--dp-reproducible"],
            tmp_path / "server.log", tmp_path,
        )
        sessions.append(server)
        for i in range(CLIENTS):
            sessions.append(Session(
                ["client", "--server", address, "--certs", str(certs), "--node-key", str(certs / f"node-{i + 1}.key"),
                 "--data", str(tmp_path / f"data-{i}"), "--state", str(tmp_path / f"state-{i}")],
                tmp_path / f"client-{i}.log", tmp_path,
            ))
        victim = sessions[-1]
        wait_for(lambda: _completed_rounds(run) >= 1, 300, "round 1")
        wait_for(victim.running_clientapp, 120, "the last client in round 2's protocol", every=0.1)
        victim.kill()
        assert server.wait(timeout=400) == 0, server.output()[-3000:]
    finally:
        for session in sessions:
            session.kill()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    said = f"{[(r['round'], len(r['clients']), r['rejected'], r.get('aggregation')) for r in records]}\n" \
           f"{server.output()[-3000:]}"
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1)), said
    assert summary["secure_aggregation"]["failed_rounds"] == 0, said
    # round 1 starts once 3 are connected (--min-clients 3), perhaps before the fourth
    assert len(records[0]["clients"]) >= CLIENTS - 1 and len(records[-1]["clients"]) == CLIENTS - 1, said
    assert not any("aggregation" in r for r in records), said  # every round moved the model
    assert all(c["dp-epsilon"] > 0 for r in records for c in r["clients"]) and summary["dp"]["epsilon"] > 0
    expected = _plain_round_one(run, tmp_path, records[0]["clients"])
    secure = load_file(run / "checkpoints" / "round-000001.safetensors")
    gap = max(float(np.abs(secure[f"model/{name}"] - value).max()) for name, value in expected.items())
    assert gap < 1e-4, gap  # quantisation, and nothing else
    up = summary["secure_aggregation"]["bytes_up_per_client_round"]
    model = summary["bytes_per_client_round"] / 2  # the model's float32 bytes, one way
    assert model < up < 3 * model  # a masked update is int64 (8 bytes a value), keys and shares are small


def _plain_round_one(run, tmp_path, clients: list[dict]) -> dict[str, np.ndarray]:
    """Round 1 as a plain FedAvg would have it: each device's training replayed in this
    process on its own files and node id (fresh state; ``--dp-reproducible`` draws the same
    batches and noise), averaged by num-examples."""
    config = RunConfig.from_mapping(json.loads((run / "config.json").read_text()))
    scenario = build_scenario(config.data, config.seed)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths,
                        config.seed)
    record = client_config(config, scenario)
    record["server-round"] = 1
    InProcessGrid(None, [])  # sets Flower's task identity, which a Message needs outside a runtime
    total, weights = {}, 0
    for client in clients:
        index = int(client["name"].split("-")[1]) - 1
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(dict(record))})
        context = Context(run_id=0, node_id=int(client["node"]), state=RecordDict(), run_config={},
                          node_config={"inbox": str(tmp_path / f"data-{index}"), "state-dir": str(tmp_path / f"replay-{index}")})
        reply = train_message(Message(content=content, dst_node_id=int(client["node"]), message_type="train"), context)
        count = int(reply.content["metrics"]["num-examples"])
        assert count == client["num-examples"]
        for name, array in reply.content["arrays"].items():
            total[name] = total.get(name, 0) + count * array.numpy().astype(np.float64)
        weights += count
    return {name: value / weights for name, value in total.items()}

