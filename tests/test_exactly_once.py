"""Exactly-once data on the edge: a round's files count as consumed only once the server kept
that round's reply (its receipt says so); a redone or dropped round trains on them again; a
client's state belongs to one run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client.app import app
from client.state_store import PENDING_FILE, PREVIOUS_RUNS, ClientStateStore
from common.config import RunConfig
from common.errors import FedtideError
from common.models import build_model
from common.receipt import RECEIPT_KEY, Receipt
from common.scenarios import build_scenario
from fedtide.runtimes.inprocess import InProcessGrid
from server.federation import client_config
from server.history import RunHistory
from server.receipts import Receipts
from server.strategy import build_strategy

RUN, OTHER = "a" * 32, "b" * 32


def _state(seen: int) -> dict[str, torch.Tensor]:
    return {"replay.seen": torch.tensor(seen)}


def _entry(name: str, server_round: int) -> dict:
    return {"name": name, "size": 1, "sha256": name * 4, "mtime_ns": 0, "round": server_round, "samples": 1}


def test_a_pending_round_becomes_the_state_once_a_receipt_covers_it(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save_pending(_state(5), [_entry("a", 1)], 1, RUN)
    assert store.load() == ({}, [])  # not consumed yet
    assert [e["pending"] for e in store.consumed()] == [True]

    tensors, ledger = store.begin_round(Receipt(RUN, 1))

    assert int(tensors["replay.seen"]) == 5 and [e["name"] for e in ledger] == ["a"]
    assert not (tmp_path / PENDING_FILE).exists()


@pytest.mark.parametrize("receipt", [Receipt(RUN, 0), Receipt(RUN, 2), Receipt(OTHER, 9)],
                         ids=["not-kept", "kept-earlier-only", "another-run"])
def test_a_round_the_server_did_not_keep_is_trained_on_again(tmp_path, receipt, caplog):
    store = ClientStateStore(tmp_path)
    store.save(_state(5), [_entry("a", 1)], RUN)
    store.save_pending(_state(9), [_entry("a", 1), _entry("b", 3)], 3, RUN)

    with caplog.at_level(logging.INFO, logger="fedtide.client"):
        tensors, ledger = store.begin_round(receipt, new_run="keep")

    assert int(tensors["replay.seen"]) == 5 and [e["name"] for e in ledger] == ["a"]  # b is new again
    assert not (tmp_path / PENDING_FILE).exists()
    if receipt.run_uid == RUN:
        assert "round 3's reply did not reach the global model" in caplog.text


def test_a_new_run_starts_clean_and_keeps_the_old_state_aside(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save(_state(5), [_entry("a", 1)], RUN)

    assert store.begin_round(Receipt(OTHER, 0)) == ({}, [])  # fresh: every inbox file is new to the new run

    aside = list((tmp_path / PREVIOUS_RUNS).iterdir())
    assert len(aside) == 1 and RUN[:16] in aside[0].name
    assert not (tmp_path / "state.safetensors").exists()


def test_a_client_told_to_keep_or_refuse_a_new_run_does_so(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save(_state(5), [_entry("a", 1)], RUN)
    with pytest.raises(FedtideError, match=r"belongs to run aaaaaaaa, and the server now runs bbbbbbbb: .*--new-run"):
        store.begin_round(Receipt(OTHER, 0), new_run="refuse")
    tensors, ledger = store.begin_round(Receipt(OTHER, 0), new_run="keep")
    assert int(tensors["replay.seen"]) == 5 and len(ledger) == 1
    with pytest.raises(FedtideError, match="not one of fresh, keep, refuse"):
        store.begin_round(Receipt(OTHER, 0), new_run="maybe")


def test_a_damaged_pending_file_is_dropped_and_its_round_redone(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save(_state(5), [_entry("a", 1)], RUN)
    (tmp_path / PENDING_FILE).write_bytes(b"\x00" * 40)
    tensors, ledger = store.begin_round(Receipt(RUN, 7))
    assert int(tensors["replay.seen"]) == 5 and len(ledger) == 1
    assert not (tmp_path / PENDING_FILE).exists()


@pytest.mark.parametrize("record", [
    {}, {"run-uid": "x", "aggregated-round": 1}, {"run-uid": "../../etc", "aggregated-round": 1},
    {"run-uid": RUN, "aggregated-round": -1}, {"run-uid": RUN, "aggregated-round": 10**12},
    {"run-uid": RUN, "aggregated-round": 1.5}, {"run-uid": RUN, "aggregated-round": True},
    {"run-uid": RUN * 3, "aggregated-round": 1}, {"run-uid": 7, "aggregated-round": 1},
])
def test_a_receipt_that_is_not_one_is_refused_with_a_reason(record):
    with pytest.raises(FedtideError, match="the server's receipt"):
        Receipt.from_record(record)


# ---- the ClientApp, as Flower calls it -------------------------------------------------------


def _train(grid: InProcessGrid, config: RunConfig, server_round: int, receipt: Receipt) -> Message:
    scenario = build_scenario(config.data, config.seed)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes,
                        config.network.hidden_widths, config.seed)
    record = client_config(config, scenario)
    record["server-round"] = server_round
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(dict(record)),
        RECEIPT_KEY: ConfigRecord({"run-uid": receipt.run_uid, "aggregated-round": receipt.aggregated_round}),
    })
    reply = list(grid.send_and_receive([grid.create_message(content, "train", 1, str(server_round))]))[0]
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    return reply


def test_an_edge_node_trains_again_on_the_files_of_a_redone_round(tmp_path):
    config = RunConfig.of(hidden="16", local_epochs=1, quiet=True)
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    np.savez(inbox / "a.npz", x=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), y=rng.integers(0, 10, 24))
    grid = InProcessGrid(app, [{"inbox": str(inbox), "state-dir": str(state)}])

    first = _train(grid, config, 1, Receipt(RUN, 0))
    redone = _train(grid, config, 1, Receipt(RUN, 0))  # the server was killed before it kept round 1
    assert first.content["metrics"]["new-examples"] == redone.content["metrics"]["new-examples"] == 24
    assert np.array_equal(first.content["arrays"]["head.weight"].numpy(), redone.content["arrays"]["head.weight"].numpy())

    kept = _train(grid, config, 2, Receipt(RUN, 1))  # round 1 kept: a.npz is consumed, once
    assert kept.content["metrics"]["new-examples"] == 0
    assert [(e["name"], e["round"]) for e in ClientStateStore(state).load()[1]] == [("a.npz", 1)]

    new_run = _train(grid, config, 1, Receipt(OTHER, 0))  # a new server run: the client starts clean
    assert new_run.content["metrics"]["new-examples"] == 24


# ---- the server's side ---------------------------------------------------------------------


def _message(node: int) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    return Message(content=content, message_type="train", dst_node_id=node)


def test_each_node_is_told_the_last_round_the_server_kept_its_reply_and_the_checkpoint_keeps_it():
    receipts = Receipts()
    receipts.aggregated(3, [11])
    receipts.aggregated(4, [12])
    receipts.aggregated(5, [11])
    shared = _message(11).content["config"]
    messages = receipts.stamp([_message(11), _message(12), _message(13)])
    told = [(m.content[RECEIPT_KEY]["run-uid"], m.content[RECEIPT_KEY]["aggregated-round"]) for m in messages]
    assert told == [(receipts.run_uid, 5), (receipts.run_uid, 4), (receipts.run_uid, 0)]
    assert Receipt.from_record(messages[0].content[RECEIPT_KEY]).aggregated_round == 5
    assert shared is not None  # the settings record stays one shared object (vectorised training relies on it)

    resumed = Receipts()
    resumed.load_state(receipts.state())
    assert (resumed.run_uid, resumed.last_aggregated) == (receipts.run_uid, {11: 5, 12: 4})
    assert Receipts().run_uid != receipts.run_uid  # each new run its own identity


def test_a_round_whose_model_the_server_did_not_keep_gives_no_receipt():
    strategy = build_strategy(min_nodes=1, history=RunHistory())
    strategy.receipts.aggregated(1, [7])
    strategy.accepted_nodes = [7]
    strategy._aggregate = lambda *args: (None, None)  # the rule kept the old model (e.g. a NaN aggregate)
    strategy._accept = lambda server_round, replies: ([], [], None)
    strategy.aggregate_train(2, [])
    assert strategy.receipts.last_aggregated == {7: 1}
    assert "receipts" in strategy.state()


def test_a_late_message_of_an_older_round_cannot_undo_a_newer_one(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save_pending(_state(9), [_entry("b", 4)], 4, RUN)
    with pytest.raises(FedtideError, match="round 3 is older than this client's last round 4"):
        store.begin_round(Receipt(RUN, 2), server_round=3)
    assert (tmp_path / PENDING_FILE).exists()  # untouched
    tensors, _ = store.begin_round(Receipt(RUN, 2), server_round=4)  # the same round, redone: trained again
    assert tensors == {}


def test_a_node_the_superlink_lost_is_named_in_its_rejection_not_the_superlink():
    from flwr.app import Error, Metadata

    strategy = build_strategy(min_nodes=1, history=RunHistory())
    sent = strategy.receipts.stamp([_message(4242)])
    sent[0].metadata.__dict__["_message_id"] = sent[0].object_id  # what Flower's Grid does when it sends it
    strategy._sent = sent
    lost = Message(error=Error(5, "Error: Node Unavailable"), metadata=Metadata(  # the SuperLink (node 1) answers
        run_id=0, message_id="", src_node_id=1, dst_node_id=0, reply_to_message_id=sent[0].metadata.message_id,
        group_id="", created_at=0.0, ttl=60.0, message_type="train"))
    strategy.aggregate_train(1, [lost])
    assert [(r["node"], r["reason"][:30]) for r in strategy.history.rejects_so_far()] == [(4242, "client failed: Error: Node Una")]
