"""The ClientApp on an edge node (node_config ``inbox`` + ``state-dir``): the server's
message in, a reply trained on the inbox's files out, state on disk, not in context.state."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client.app import app
from client.state_store import ClientStateStore
from common.config import RunConfig
from common.models import build_model
from common.scenarios import build_scenario
from fedtide.runtimes.inprocess import InProcessGrid
from server.federation import client_config


def _edge_node(inbox, state) -> InProcessGrid:
    """One edge node behind the in-process Grid: the ClientApp as Flower would call it."""
    return InProcessGrid(app, [{"inbox": str(inbox), "state-dir": str(state)}])


def _train(grid: InProcessGrid, config: RunConfig, server_round: int) -> Message:
    scenario = build_scenario(config.data, config.seed)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths, config.seed)
    record = client_config(config, scenario)
    record["server-round"] = server_round
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(dict(record))})
    message = grid.create_message(content, "train", dst_node_id=1, group_id=str(server_round))
    return list(grid.send_and_receive([message]))[0]


def test_an_edge_node_trains_on_its_inbox_and_keeps_state_on_disk(tmp_path, capsys):
    config = RunConfig.of(hidden="16", local_epochs=1, quiet=True)
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    np.savez(inbox / "a.npz", x=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), y=rng.integers(0, 10, 24))
    grid = _edge_node(inbox, state)

    reply = _train(grid, config, 1)

    assert not reply.has_error(), reply.error if reply.has_error() else None
    metrics = reply.content["metrics"]
    assert (metrics["num-examples"], metrics["new-files"], metrics["new-examples"]) == (24, 1, 24)
    assert len(grid.contexts[1].state) == 0  # nothing in memory: a restarted SuperNode loses nothing
    tensors, ledger = ClientStateStore(state).load()
    # the first task's samples wait in replay's stage until the client sees that task end
    assert [e["name"] for e in ledger] == ["a.npz"] and int(tensors["replay.stage.seen"]) == 24
    assert "round 1: 1 new file(s), 24 new samples" in capsys.readouterr().err

    second = _train(grid, config, 2)  # no new file: rehearses its memory
    assert second.content["metrics"]["new-files"] == 0 and second.content["metrics"]["num-examples"] == 24


def test_an_edge_node_with_no_data_answers_with_an_error_not_a_crash(tmp_path):
    config = RunConfig.of(hidden="16", local_epochs=1, quiet=True)
    reply = _train(_edge_node(tmp_path / "in", tmp_path / "s"), config, 1)
    assert reply.has_error() and "no data yet" in reply.error.reason


def test_an_edge_node_takes_its_feature_range_from_its_node_config(tmp_path):
    config = RunConfig.of(hidden="16", local_epochs=1, quiet=True)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    np.savez(inbox / "raw.npz", x=rng.integers(0, 256, (12, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 12))
    refused = _train(_edge_node(inbox, tmp_path / "a"), config, 1)  # default [0, 1]: 0..255 floats are refused
    assert refused.has_error() and "1 invalid file(s)" in refused.error.reason
    (inbox / "quarantine" / "raw.npz").rename(inbox / "raw.npz")
    grid = InProcessGrid(app, [{"inbox": str(inbox), "state-dir": str(tmp_path / "b"), "feature-range": "0,255"}])
    assert _train(grid, config, 1).content["metrics"]["new-examples"] == 12


def test_an_edge_node_offered_several_models_trains_the_one_that_fits_its_new_files(tmp_path):
    import torch

    config = RunConfig.of(hidden="16", local_epochs=1, quiet=True, training="clustered")
    scenario = build_scenario(config.data, config.seed)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), rng.integers(0, 10, 40)
    np.savez(inbox / "a.npz", x=x, y=y)
    initial = build_model(config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths, config.seed)
    fitted = build_model(config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths, config.seed)
    optimizer = torch.optim.SGD(fitted.parameters(), lr=0.5)
    inputs, labels = torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 255, torch.tensor(y)
    for _ in range(200):  # this model has learned these very samples
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(fitted(inputs), labels).backward()
        optimizer.step()
    record = client_config(config, scenario)
    record["server-round"] = 1
    record["cluster-choice"] = "loss"
    content = RecordDict({"arrays": ArrayRecord(initial.state_dict()), "config": ConfigRecord(dict(record)),
                          "model-0": ArrayRecord(initial.state_dict()), "model-3": ArrayRecord(fitted.state_dict())})
    grid = _edge_node(inbox, tmp_path / "state")
    reply = list(grid.send_and_receive([grid.create_message(content, "train", dst_node_id=1, group_id="1")]))[0]
    assert not reply.has_error(), reply.error if reply.has_error() else None
    metrics = reply.content["metrics"]
    assert metrics["cluster"] == 3
    assert metrics["cluster-losses"][1] == metrics["cluster-loss"] < metrics["cluster-losses"][0]

    record["cluster-choice"] = "oracle"  # an edge client knows no concept
    content["config"] = ConfigRecord(dict(record))
    refused = list(grid.send_and_receive([grid.create_message(content, "train", dst_node_id=1, group_id="2")]))[0]
    assert refused.has_error() and "needs a simulation" in refused.error.reason
