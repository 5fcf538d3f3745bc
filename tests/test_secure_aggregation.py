"""Secure aggregation (--secure-aggregation, SecAgg+): the server gets the plain round's model
within quantisation error and never an individual update; clients that drop out mid-protocol
or send hostile protocol replies cost the round at most their own update; what needs single
updates is refused in one line; client-level DP composes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from client import app as plain
from client.secure_aggregation import secure_aggregation_mod
from common.secure_aggregation import SECURE_CONFIGS
from common.config import RunConfig
from common.errors import FedtideError
from fedtide.runtimes import inprocess
from fedtide.runtimes.inprocess import run_inprocess
from server.secure_round import CheckedStages, shares_for
from server.strategy import FedtideStrategy


def _config(tmp_path, name: str, **settings) -> RunConfig:
    return RunConfig.of(num_tasks=1, rounds_per_task=settings.pop("rounds", 1), quiet=True, out=str(tmp_path / name),
                        **settings)


def _rounds(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stage(msg: Message) -> str:
    return str(msg.content.config_records[SECURE_CONFIGS].get("stage", "")) if SECURE_CONFIGS in msg.content.config_records else ""


def _client_app(behave) -> ClientApp:
    """fedtide's ClientApp whose node ``behave(msg, context, reply)`` may replace the reply
    (or raise) at each protocol stage, after Flower's mod: what goes on the wire."""
    app = ClientApp()

    def tampered(msg, context, call_next):
        stage = _stage(msg)
        reply = secure_aggregation_mod(msg, context, call_next)
        return behave(stage, msg, context, reply)

    @app.train(mods=[tampered])
    def train(msg, context):
        return plain.train_message(msg, context)

    app.evaluate()(plain.evaluate)
    return app


def test_a_secure_round_gives_the_plain_model_within_quantisation_and_no_reply_carries_an_update(tmp_path, monkeypatch):
    plain_summary = run_inprocess(_config(tmp_path, "plain"), threads=1)
    replies: list[tuple[bool, int]] = []  # as each reply left its client: a protocol reply? bytes of arrays
    deliver = inprocess.InProcessGrid.send_and_receive

    def recorded(self, messages, *, timeout=None):
        out = list(deliver(self, messages, timeout=timeout))
        replies.extend((SECURE_CONFIGS in r.content.config_records,
                        sum(len(a.data) for record in r.content.array_records.values() for a in record.values()))
                       for r in out)
        return out

    def no_plain_aggregation(*args, **kwargs):
        raise AssertionError("a secure run must not aggregate single replies")

    monkeypatch.setattr(inprocess.InProcessGrid, "send_and_receive", recorded)
    monkeypatch.setattr(FedtideStrategy, "aggregate_train", no_plain_aggregation)
    secure_summary = run_inprocess(_config(tmp_path, "secure", secure_aggregation=True, secure_max_weight=2000),
                                   threads=1)

    before, after = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "secure" / "model.safetensors")
    gap = max(float(np.abs(before[k] - after[k]).max()) for k in before)
    assert 0 < gap < 1e-4  # quantisation (2^22 levels over [-8, 8], num-examples / 2000) and nothing else
    assert secure_summary["secure_aggregation"]["failed_rounds"] == 0 and secure_summary["rejected_replies"] == 0
    assert abs(secure_summary["acc"] - plain_summary["acc"]) < 0.01
    assert sum(protocol for protocol, _ in replies) == 4 * 5  # four stages, five clients
    assert all(size == 0 for _, size in replies)  # no reply holds weights: protocol replies nor evaluations
    [record] = _rounds(tmp_path / "secure")
    assert len(record["clients"]) == 5 and all(c["num-examples"] > 0 for c in record["clients"])


def test_clients_that_drop_out_mid_protocol_cost_only_their_update(tmp_path, monkeypatch):
    lost = {}

    def behave(stage, msg, context, reply):
        partition = int(context.node_config["partition-id"])
        if partition == 1 and stage == "collect_masked_vectors":  # crashes while training: no masked update
            lost[1] = stage
            raise RuntimeError("device lost power")
        if partition == 2 and stage == "unmask":  # its masked update is in; it vanishes before unmasking
            lost[2] = stage
            raise RuntimeError("device lost network")
        return reply

    monkeypatch.setattr("client.faults.faulty_client_app", lambda faults: _client_app(behave))
    summary = run_inprocess(_config(tmp_path, "dropouts", secure_aggregation=True, rounds=2), threads=1, vectorize=False)
    assert lost == {1: "collect_masked_vectors", 2: "unmask"}
    assert summary["secure_aggregation"]["failed_rounds"] == 0
    records = _rounds(tmp_path / "dropouts")
    assert [len(r["clients"]) for r in records] == [4, 4]  # node 2's update counted; node 1 sent none
    assert records[1]["accuracy_seen_tasks"] > records[0]["accuracy_seen_tasks"] > 0.3


def test_a_client_lost_at_key_setup_is_left_out_and_three_updates_are_the_least_a_round_unmasks(tmp_path, monkeypatch):
    def lost_at_setup(stage, msg, context, reply):
        if int(context.node_config["partition-id"]) == 4 and stage == "setup":
            raise RuntimeError("no network")
        return reply

    monkeypatch.setattr("client.faults.faulty_client_app", lambda faults: _client_app(lost_at_setup))
    summary = run_inprocess(_config(tmp_path, "setup", secure_aggregation=True), threads=1, vectorize=False)
    assert summary["secure_aggregation"]["failed_rounds"] == 0
    assert len(_rounds(tmp_path / "setup")[0]["clients"]) == 4

    def one_of_three_lost(stage, msg, context, reply):  # 2 of 3 could still be unmasked, but would give each other away
        if int(context.node_config["partition-id"]) == 0 and stage == "collect_masked_vectors":
            raise RuntimeError("device lost power")
        return reply

    monkeypatch.setattr("client.faults.faulty_client_app", lambda faults: _client_app(one_of_three_lost))
    summary = run_inprocess(_config(tmp_path, "three", secure_aggregation=True, clients=3), threads=1, vectorize=False)
    [record] = _rounds(tmp_path / "three")
    assert summary["secure_aggregation"]["failed_rounds"] == 1 and record["clients"] == []
    assert "fewer than 3 gives each away" in record["aggregation"]["skipped"]


def _bad_masked(reply: Message) -> Message:
    record = reply.content.config_records[SECURE_CONFIGS]
    vectors = list(record["masked_params"])
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3, np.int64))  # the wrong shape: would break the sum
    vectors[1] = buffer.getvalue()
    record["masked_params"] = vectors
    return reply


def _bad_shares(reply: Message) -> Message:
    record = reply.content.config_records[SECURE_CONFIGS]
    record["dsts"] = [10**12 for _ in record["dsts"]]  # a node that is not in the round
    return reply


@pytest.mark.parametrize("stage, tamper, reason", [
    ("collect_masked_vectors", _bad_masked, "masked array has shape"),
    ("share_keys", _bad_shares, "must name each node it was asked about once"),
])
def test_a_hostile_protocol_reply_is_dropped_with_its_reason_and_the_round_goes_on(tmp_path, monkeypatch, stage, tamper,
                                                                                   reason):
    def behave(current, msg, context, reply):
        if int(context.node_config["partition-id"]) == 3 and current == stage:
            return tamper(reply)
        return reply

    monkeypatch.setattr("client.faults.faulty_client_app", lambda faults: _client_app(behave))
    summary = run_inprocess(_config(tmp_path, "hostile", secure_aggregation=True), threads=1, vectorize=False)
    assert summary["secure_aggregation"]["failed_rounds"] == 0 and summary["rejected_replies"] == 1
    [record] = _rounds(tmp_path / "hostile")
    assert len(record["clients"]) == 4 and record["accuracy_seen_tasks"] > 0.3
    assert reason in record["rejected"][0]["reason"]


def test_a_round_that_cannot_recover_the_sum_keeps_the_model_and_the_run_goes_on(tmp_path, monkeypatch):
    def behave(stage, msg, context, reply):  # three of five vanish after sending their masked updates
        if int(context.node_config["partition-id"]) < 3 and stage == "unmask":
            raise RuntimeError("network partition")
        return reply

    monkeypatch.setattr("client.faults.faulty_client_app", lambda faults: _client_app(behave))
    summary = run_inprocess(_config(tmp_path, "partition", secure_aggregation=True, rounds=2), threads=1,
                            vectorize=False)
    assert summary["secure_aggregation"]["failed_rounds"] == 2
    records = _rounds(tmp_path / "partition")
    assert all(r["accuracy_seen_tasks"] == records[0]["accuracy_seen_tasks"] for r in records)  # the model stayed
    assert all("secure aggregation" in r["aggregation"]["skipped"] for r in records)


def _record(**values) -> RecordDict:
    return RecordDict({SECURE_CONFIGS: ConfigRecord(values)})


def _masked(shapes, dtype=np.int64, high=2**32) -> list[bytes]:
    out = []
    for shape in shapes:
        buffer = io.BytesIO()
        np.save(buffer, np.full(shape, high - 1, dtype))
        out.append(buffer.getvalue())
    return out


def _fitres(content: RecordDict, examples=5, metrics=None, status=0, clear=False) -> RecordDict:
    content["fitres.parameters"] = ArrayRecord([np.ones(3)]) if clear else ArrayRecord()
    content["fitres.num_examples"] = MetricRecord({"num_examples": examples})
    content["fitres.metrics"] = ConfigRecord(metrics if metrics is not None else {"num-examples": examples})
    content["fitres.status"] = ConfigRecord({"code": status, "message": "ok"})
    return content


def _keys(*seeds: int) -> list[bytes]:
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    return [public_key_to_bytes(generate_key_pairs()[1]) for _ in seeds]


PK1, PK2 = _keys(1, 2)
MASKED = [(1,), (2, 3), (4,)]


@pytest.mark.parametrize("stage, content, expected, reason", [
    ("setup", _record(pk1=PK1), set(), "public keys must be"),
    ("setup", _record(pk1=b"k" * 5000, pk2=PK2), set(), "public keys must be"),
    ("setup", _record(pk1=PK1, pk2=PK1), set(), "repeat a key"),
    ("setup", _record(pk1=b"not a key", pk2=PK2), set(), "do not parse"),
    ("share_keys", _record(dsts=[1, 2], ctxts=[b"c"]), {1, 2}, "lists of the same length"),
    ("share_keys", _record(dsts=[1, 1], ctxts=[b"c", b"c"]), {1, 2}, "once, and no other"),
    ("share_keys", _record(dsts=[True], ctxts=[b"c"]), {1}, "once, and no other"),
    ("share_keys", _record(dsts=[1, 7], ctxts=[b"c", b"c"]), {1, 2}, "once, and no other"),  # a node it was not sent
    ("share_keys", _record(dsts=[1], ctxts=[b"c"]), {1, 2}, "once, and no other"),  # one share left out
    ("unmask", _record(nids=[1], shares=[b"s" * 2000]), {1}, "at most 1024 bytes"),
    ("unmask", _record(nids=[1, 9], shares=[b"s"] * 2), {1, 2}, "once, and no other"),  # a node it was not asked about
    ("collect_masked_vectors", _fitres(_record(masked_params=_masked(MASKED[:2]))), set(), "must be 3 arrays"),
    ("collect_masked_vectors", _fitres(_record(masked_params=_masked(MASKED, np.float64))), set(), "int64"),
    ("collect_masked_vectors", _fitres(_record(masked_params=_masked(MASKED, np.int8, 100))), set(), "int64"),
    ("collect_masked_vectors", _fitres(_record(masked_params=_masked(MASKED, high=2**40))), set(), "range"),
    ("collect_masked_vectors", _record(masked_params=_masked(MASKED)), set(), "FitRes records"),
    ("collect_masked_vectors", _fitres(_record(masked_params=_masked(MASKED)), examples=-1), set(), "whole number"),
    ("collect_masked_vectors", _fitres(_record(masked_params=_masked(MASKED)), metrics={"x": [1.0]}), set(), "metrics"),
    ("collect_masked_vectors", _fitres(_record(masked_params=_masked(MASKED)), status=5), set(), "code 0"),
    ("collect_masked_vectors", _fitres(_record(masked_params=_masked(MASKED)), clear=True), set(), "in the clear"),
    ("collect_masked_vectors", _fitres(_record(masked_params=[b"\x93NUMPY garbage"] * 3)), set(), "unreadable"),
    ("share_keys", RecordDict({"other": ConfigRecord({})}), {1}, "no SecAgg+ record"),
])
def test_each_stage_checks_its_replies_before_the_protocol_reads_them(stage, content, expected, reason):
    checked = CheckedStages(inner=None, nodes={1, 2, 3, 4, 5}, shapes=[(2, 3), (4,)], traffic={"down": 0, "up": 0})
    try:
        found = checked._check(stage, content, expected, set())
    except Exception as error:  # send_and_receive drops a reply the checks cannot read, with this reason
        found = f"unreadable {stage} reply ({type(error).__name__})"
    assert found is not None and reason in found, found


def test_a_valid_masked_reply_passes():
    checked = CheckedStages(inner=None, nodes={1, 2, 3}, shapes=[(2, 3), (4,)], traffic={"down": 0, "up": 0})
    content = _fitres(_record(masked_params=_masked([(1,), (2, 3), (4,)])))
    assert checked._check("collect_masked_vectors", content, set(), set()) is None
    keys: set[bytes] = set()
    assert checked._check("setup", _record(pk1=PK1, pk2=PK2), set(), keys) is None
    assert "repeat" in checked._check("setup", _record(pk1=PK2, pk2=_keys(3)[0]), set(), keys)  # a key seen this round


@pytest.mark.parametrize("settings, flag", [
    ({"aggregation": "median"}, "--aggregation median"),
    ({"compress": "int4"}, "--compress"),
    ({"buffer_size": 2}, "--buffer-size"),
    ({"training": "clustered"}, "--training clustered"),
    ({"drift_weight": 2.0}, "--drift-weight"),
    ({"clients": 2}, "at least 3 clients"),
    ({"clients": 10, "fraction_train": 0.2}, "at least 3 clients"),
])
def test_what_needs_single_updates_is_refused_in_one_line(settings, flag):
    with pytest.raises(FedtideError) as error:
        RunConfig.of(secure_aggregation=True, **settings).validate()
    assert flag in str(error.value) and "\n" not in str(error.value)


def test_key_shares_grow_with_the_log_of_the_round_and_stay_odd():
    assert [shares_for(n) for n in (3, 5, 9)] == [3, 5, 9]
    assert shares_for(100) == 15 and shares_for(1000) == 21 and all(shares_for(n) % 2 for n in (10, 64, 500))


def test_client_level_dp_composes_with_secure_aggregation(tmp_path):
    settings = {"dp": "client", "dp_noise": 0.1, "dp_clip": 5.0, "dp_reproducible": True}
    plain_dp = run_inprocess(_config(tmp_path, "dp", **settings), threads=1)
    secure_dp = run_inprocess(_config(tmp_path, "secure-dp", secure_aggregation=True, **settings), threads=1)
    assert secure_dp["dp"]["epsilon"] == pytest.approx(plain_dp["dp"]["epsilon"])  # the same rounds, the same budget
    assert secure_dp["secure_aggregation"]["failed_rounds"] == 0
    # the same clipped sum and the same seeded noise: the same model, but for quantisation
    before, after = load_file(tmp_path / "dp" / "model.safetensors"), load_file(tmp_path / "secure-dp" / "model.safetensors")
    assert max(float(np.abs(before[k] - after[k]).max()) for k in before) < 1e-5
    assert abs(secure_dp["acc"] - plain_dp["acc"]) < 0.02


def test_the_mod_passes_plain_messages_to_the_handler_untouched():
    msg = Message(content=RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=1, message_type="train")
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})
    seen = []
    secure_aggregation_mod(msg, context, lambda m, c: seen.append(m) or m)
    assert seen == [msg]


def test_the_automatic_max_weight_follows_the_median_count_so_one_liar_cannot_coarsen_the_sum():
    from server.secure_round import SecureRound

    auto = SecureRound(strategy=None, timeout=1.0, max_weight=0.0)
    assert auto.weight_for() == 10_000  # nothing known yet
    auto.last_counts = [100, 120, 130, 10**9]
    assert auto.weight_for() == 4 * 125
    assert SecureRound(strategy=None, timeout=1.0, max_weight=700.0, last_counts=[5]).weight_for() == 700


@pytest.mark.parametrize("state", [
    None, [], "x", {"last_counts": [0, 5]}, {"last_counts": [True]}, {"last_counts": [1.5]}, {"last_counts": [10**12]},
    {"last_counts": list(range(1, 10**5))}, {"traffic": {"down": -1, "up": 3}}, {"traffic": {"down": 1}},
    {"client_rounds": float("nan")}, {"failed_rounds": -2}, {"failed_rounds": "3"},
])
def test_a_checkpoints_secure_state_out_of_bounds_leaves_the_start_values(state):
    from server.secure_round import SecureRound

    fresh = SecureRound(strategy=None, timeout=1.0, max_weight=0.0)
    fresh.load_state(state)
    assert fresh.state() == SecureRound(strategy=None, timeout=1.0, max_weight=0.0).state()
    saved = SecureRound(strategy=None, timeout=1.0, max_weight=0.0, last_counts=[60, 70, 80], client_rounds=12,
                        failed_rounds=1, traffic={"down": 500, "up": 900})
    fresh.load_state(saved.state())
    assert fresh.state() == saved.state() and fresh.weight_for() == 4 * 70


def test_sample_level_dp_composes_with_secure_aggregation(tmp_path):
    summary = run_inprocess(_config(tmp_path, "sample", secure_aggregation=True, dp="sample", rounds=2), threads=1)
    assert summary["dp"]["level"] == "sample" and summary["dp"]["epsilon"] > 0
    assert summary["secure_aggregation"]["failed_rounds"] == 0 and summary["rejected_replies"] == 0
    records = _rounds(tmp_path / "sample")
    assert all(len(r["clients"]) == 5 and all(c["dp-epsilon"] > 0 for c in r["clients"]) for r in records)


@pytest.mark.parametrize("config", [
    {"secure-clip": float("nan")}, {"secure-clip": float("inf")}, {"secure-clip": -1.0}, {"secure-clip": True},
    {"secure-clip": "5"}, {"secure-unit-weight": 1},
])
def test_a_secure_round_instruction_that_is_not_a_bound_is_refused_by_the_client(config):
    from client.secure_aggregation import round_bounds

    with pytest.raises(FedtideError) as error:
        round_bounds(config)
    assert "the server sent" in str(error.value)
    assert round_bounds({"secure-clip": 2.5, "secure-unit-weight": True}) == (2.5, True)
