"""Rounds in simulated time: client speeds, staleness, synchronous and buffered asynchronous aggregation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import RunConfig
from common.errors import FedtideError
from fedtide.runtimes.inprocess import run_inprocess
from server.staleness import Staleness
from server.timed_rounds import ClientSpeeds


def test_client_speeds_span_exactly_the_spread_and_depend_only_on_the_seed():
    speeds = ClientSpeeds.build(list(range(1, 21)), spread=10.0, seed=0)
    values = sorted(speeds.seconds.values())
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(10.0)
    assert len(set(values)) == 20
    assert speeds == ClientSpeeds.build(list(range(20, 0, -1)), 10.0, seed=0)  # node order does not matter
    assert speeds != ClientSpeeds.build(list(range(1, 21)), 10.0, seed=1)
    assert set(ClientSpeeds.build([1, 2, 3], 1.0, 0).seconds.values()) == {1.0}


def test_a_stale_reply_is_rebased_on_the_current_model_and_weighted_by_its_age():
    staleness = Staleness(exponent=0.5)
    base = {"w": np.zeros(2, np.float32), "steps": np.array([5], np.int64)}
    staleness.sent(node=7, arrays=base)
    for _ in range(3):  # the global model moves on three times while node 7 trains
        staleness.updated()
    current = {"w": np.ones(2, np.float32), "steps": np.array([9], np.int64)}
    reply = {"w": np.full(2, 4.0, np.float32), "steps": np.array([6], np.int64)}
    rebased, tau = staleness.rebase(7, reply, current)
    assert tau == 3
    assert rebased["w"] == pytest.approx(1.0 + 4.0 / 2.0)  # 1 / sqrt(1 + 3) = 1/2
    assert rebased["steps"].tolist() == [9]  # counters are not averaged: the current model's stay
    assert staleness.weight(0) == 1.0


def test_a_base_model_is_kept_only_while_a_node_still_trains_it():
    staleness = Staleness()
    staleness.sent(1, {"w": np.zeros(1, np.float32)})
    staleness.updated()
    staleness.sent(2, {"w": np.ones(1, np.float32)})
    assert sorted(staleness.bases) == [0, 1]
    staleness.rebase(1, {"w": np.zeros(1, np.float32)}, {"w": np.ones(1, np.float32)})
    staleness.updated()
    assert sorted(staleness.bases) == [1]
    staleness.unanswered(2)
    staleness.updated()
    assert staleness.bases == {}


def test_a_node_sent_again_before_its_last_reply_was_used_keeps_each_replys_own_base():
    staleness = Staleness(exponent=1.0)
    staleness.sent(3, {"w": np.zeros(1, np.float32)})  # version 0
    staleness.updated()
    staleness.sent(3, {"w": np.ones(1, np.float32)})  # version 1, its first reply still unused
    current = {"w": np.ones(1, np.float32)}
    first, _ = staleness.rebase(3, {"w": np.full(1, 2.0, np.float32)}, current)
    second, _ = staleness.rebase(3, {"w": np.full(1, 2.0, np.float32)}, current)
    assert first["w"] == pytest.approx(1.0 + 2.0 / 2)  # from version 0: 1 update old
    assert second["w"] == pytest.approx(2.0)  # from version 1: fresh


def test_a_message_never_answered_does_not_take_the_base_of_a_reply_still_waiting():
    staleness = Staleness(exponent=1.0)
    staleness.sent(3, {"w": np.zeros(1, np.float32)})  # version 0: its reply waits in the buffer
    staleness.updated()
    staleness.sent(3, {"w": np.ones(1, np.float32)})  # version 1: this one times out
    staleness.unanswered(3)
    rebased, tau = staleness.rebase(3, {"w": np.full(1, 2.0, np.float32)}, {"w": np.ones(1, np.float32)})
    assert tau == 1 and rebased["w"] == pytest.approx(1.0 + 2.0 / 2)


SMALL = dict(num_tasks=2, rounds_per_task=3, local_epochs=2, clients=6, quiet=True)


def test_synchronous_rounds_in_simulated_time_compute_what_plain_rounds_do(tmp_path):
    plain = run_inprocess(RunConfig.of(**SMALL, out=str(tmp_path / "plain")))
    timed = run_inprocess(RunConfig.of(**SMALL, speed_spread=10.0, out=str(tmp_path / "timed")))
    assert timed["accuracy_matrix"] == plain["accuracy_matrix"]
    assert timed["rounds"] == plain["rounds"] and timed["model_updates"] == plain["rounds"]
    assert timed["simulated_seconds"] == pytest.approx(10.0 * plain["rounds"])  # each round waits for the slowest


def _replies_per_node(run_dir) -> tuple[dict[int, int], list[int]]:
    counts: dict[int, int] = {}
    staleness = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        for client in json.loads(line)["clients"]:
            counts[client["node"]] = counts.get(client["node"], 0) + 1
            staleness.append(client["staleness"])
    return counts, staleness


def test_buffered_asynchronous_aggregation_waits_for_no_one_and_discounts_stale_replies(tmp_path):
    config = RunConfig.of(**SMALL, speed_spread=10.0, buffer_size=2, concurrency=4, seed=0, out=str(tmp_path / "async"))
    summary = run_inprocess(config)
    sync = run_inprocess(config.replace(buffer_size=0, concurrency=0, fraction_train=4 / 6, out=str(tmp_path / "sync")))
    assert summary["rounds"] == sync["rounds"] == config.num_rounds  # the same simulated time
    assert summary["model_updates"] > 2 * sync["model_updates"]  # no update waits for the slowest client
    counts, staleness = _replies_per_node(tmp_path / "async")
    speeds = ClientSpeeds.build(list(range(1, 7)), 10.0, seed=0).seconds
    fastest, slowest = min(speeds, key=speeds.get), max(speeds, key=speeds.get)
    assert counts.get(fastest, 0) > 1.5 * counts.get(slowest, 0)  # the fast come back more often
    assert max(staleness) > 0 and min(staleness) == 0
    again = run_inprocess(config.replace(out=str(tmp_path / "again")))
    assert again["accuracy_matrix"] == summary["accuracy_matrix"]  # the same seed, the same run


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(buffer_size=5, concurrency=3), "waits for more replies than the 3 clients in flight"),
        (dict(buffer_size=6, clients=5), "waits for more replies than the 5 clients in flight"),
        (dict(concurrency=9, clients=5), "--concurrency 9 is more than the 5 clients"),
        (dict(buffer_size=2, react_server=True), "drop --react-server or --buffer-size"),
        (dict(buffer_size=2, scenario="distributed-drift", training="clustered"), "drop --training clustered"),
        (dict(speed_spread=5.0, fraction_evaluate=0.5), "--fraction-evaluate is for rounds in real time"),
    ],
)
def test_settings_that_cannot_work_asynchronously_are_refused_in_one_line(settings, message):
    with pytest.raises(FedtideError, match=message.replace("-", r"\-").replace("(", r"\(")):
        RunConfig.of(**settings)


def test_a_run_in_simulated_time_refuses_to_resume(tmp_path):
    config = RunConfig.of(**SMALL, buffer_size=2, out=str(tmp_path / "run"))
    run_inprocess(config)
    with pytest.raises(FedtideError, match="cannot resume yet"):
        run_inprocess(config, resume=True)


def test_each_synchronous_round_in_simulated_time_is_labelled_with_the_round_it_was_sent_in(tmp_path):
    config = RunConfig.of(**SMALL, speed_spread=10.0, fraction_train=0.5, seed=2, out=str(tmp_path / "run"))
    run_inprocess(config)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, config.num_rounds + 1))
    assert all(r["clients"] for r in rounds)  # a half-sampled round ends before its virtual round does


def test_a_live_asynchronous_server_with_no_node_left_stops_with_a_clear_message():
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from server.history import RunHistory
    from server.live_buffered import run_live_buffered
    from server.strategy import build_strategy
    from common.sections import ServerSettings

    class NoNodes:
        def get_node_ids(self):
            return []

    strategy = build_strategy(ServerSettings(buffer_size=2, client_wait=0.2), min_nodes=0, history=RunHistory())
    clock = iter(float(t) for t in range(1000))
    with pytest.raises(FedtideError, match="no node is left to train"):
        run_live_buffered(strategy, NoNodes(), ArrayRecord({"w": Array(np.zeros(2, np.float32))}), first_round=1,
                          num_rounds=3, timeout=10, buffer_size=2, concurrency=2, train_config=ConfigRecord({}),
                          evaluate_fn=lambda r, a: None, after_round=lambda r, a: None,
                          clock=lambda: next(clock), sleep=lambda s: None)
