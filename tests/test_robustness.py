"""Robust aggregation, reply limits, node exclusion and fault injection (issue #7)."""

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.app import train_many
from client.faults import FaultInjection, faulty_train_many, plant_backdoor, poison_labels
from client.rounds import TrainOutcome
from common.config import RunConfig
from common.datasets import LabelledSplit
from common.errors import FedtideError
from common.models import build_model
from common.schedule import TaskSchedule
from fedtide.runtimes.inprocess import InProcessGrid, run_inprocess
from server.history import RunHistory
from reply_fuzz import fuzz_replies, run_fuzz
from server.robust import AggregationRule, update_norm
from server.run_folder import RunFolder
from server.sampling import NodeSampling
from server.strategy import FedtideStrategy, run_strategy
from server.validation import ReplyValidator
from server.validation import array_specs, validate_reply

ZERO = {"v": np.zeros(2, np.float32)}


def rows(*values) -> list[dict[str, np.ndarray]]:
    return [{"v": np.asarray(v, np.float32)} for v in values]


# ---- the rules, against hand-computed results ----------------------------------------
def test_median_is_coordinatewise_and_ignores_an_outlier():
    out = AggregationRule("median").aggregate(rows([1, 5], [2, -100], [1000, 6]), [1, 1, 1], ZERO)
    assert out["v"].tolist() == [2, 5] and out["v"].dtype == np.float32
    even = AggregationRule("median").aggregate(rows([1, 0], [2, 0], [3, 0], [100, 0]), [1] * 4, ZERO)
    assert even["v"].tolist() == [2.5, 0]


def test_trimmed_mean_cuts_the_extremes_of_each_coordinate():
    replies = rows([1, 10], [2, 20], [3, 30], [4, 40], [100, -999])
    out = AggregationRule("trimmed-mean", trim_fraction=0.2).aggregate(replies, [1] * 5, ZERO)
    assert out["v"].tolist() == [3, 20]  # mean(2, 3, 4) and mean(10, 20, 30)


def test_multikrum_drops_the_far_reply_and_averages_the_rest_by_weight():
    replies = rows([0, 0], [0.1, 0], [0.2, 0], [0.3, 0], [100, 100])
    out = AggregationRule("multikrum", tolerated_attackers=1).aggregate(replies, [1, 1, 1, 3, 1], ZERO)
    assert np.allclose(out["v"], [(0 + 0.1 + 0.2 + 0.9) / 6, 0])


def test_clip_bounds_each_update_norm_before_the_weighted_mean():
    reference = {"v": np.ones(2, np.float32)}
    replies = rows([4, 5], [1.3, 1.4])  # updates (3, 4) of norm 5 and (0.3, 0.4)
    out = AggregationRule("clip", clip_norm=1.0).aggregate(replies, [1, 1], reference)
    assert np.allclose(out["v"], [1 + (0.6 + 0.3) / 2, 1 + (0.8 + 0.4) / 2])


# ---- preconditions -----------------------------------------------------------------
@pytest.mark.parametrize(
    "rule, replies, words",
    [
        (AggregationRule("multikrum", tolerated_attackers=1), 4, "more than 4 valid replies, got 4"),
        (AggregationRule("trimmed-mean", trim_fraction=0.2), 2, "would keep none"),
        (AggregationRule("median"), 0, "at least 1"),
    ],
)
def test_a_rule_says_when_too_few_replies_arrived(rule, replies, words):
    assert words in rule.precondition(replies)
    with pytest.raises(ValueError):
        rule.aggregate(rows(*[[0, 0]] * replies), [1] * replies, ZERO)


def test_rules_accept_enough_replies():
    assert AggregationRule("multikrum", tolerated_attackers=1).precondition(5) is None
    assert AggregationRule("trimmed-mean", trim_fraction=0.2).precondition(3) is None


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(aggregation="multikrum", clients=4, tolerated_attackers=1), "use --clients 5 or more"),
        (dict(aggregation="multikrum", clients=10, fraction_train=0.3), "at most 3 arrive"),
        (dict(aggregation="trimmed-mean", clients=2), "keeps none"),
        (dict(aggregation="clip"), "--clip-norm"),
        (dict(trim_fraction=0.5), "[0, 0.5)"),
        (dict(attack="nan"), "--attackers K"),
        (dict(attackers=1), "choose an --attack"),
        (dict(attack="nan", attacker_ids="0,7"), "partition ids 0..4"),
        (dict(aggregation="geomedian"), "unknown aggregation"),
    ],
)
def test_impossible_robustness_settings_fail_at_startup(settings, words):
    with pytest.raises(FedtideError) as err:
        RunConfig.of(**settings)
    assert words in str(err.value)


# ---- a strategy on the in-process grid -----------------------------------------------
GLOBAL = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}


def content(value: float, num_examples: int = 10) -> RecordDict:
    arrays = {k: torch.full_like(v, value) for k, v in GLOBAL.items()}
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": num_examples})})


def federation(replies_of, nodes: int, asked: list):
    """Node i (partition i) replies ``replies_of(i, round)``; ``asked`` records (round, node)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition, server_round = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        asked.append((server_round, partition))
        return Message(content=replies_of(partition, server_round), reply_to=msg)

    return InProcessGrid(app, [{"partition-id": i} for i in range(nodes)])


def run_rounds(replies_of, nodes: int, rounds: int, max_update_norm: float = 0.0, **strategy_settings):
    history = RunHistory(TaskSchedule.build(num_tasks=1, rounds_per_task=rounds, clients=nodes, spread=0, seed=0))
    strategy = FedtideStrategy(
        history=history, validator=ReplyValidator(1000, max_update_norm=max_update_norm),
        sampling=NodeSampling(1.0, 0.0, nodes, client_wait=60.0), **strategy_settings
    )
    models, asked = {}, []

    def evaluate(server_round, arrays):
        models[server_round] = arrays.to_torch_state_dict()
        history.close_round(server_round, [0.0], 0.0)

    strategy.start(federation(replies_of, nodes, asked), ArrayRecord(GLOBAL), num_rounds=rounds, evaluate_fn=evaluate)
    return models, history, asked


def test_fedavg_is_the_weighted_mean_of_the_valid_replies_as_flower_computes_it():
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    values = {0: (1.0, 10), 1: (2.0, 30), 2: (float("nan"), 60)}  # node 2 is dropped: NaN
    models, history, _ = run_rounds(lambda i, r: content(values[i][0], values[i][1]), 3, 1)
    assert np.allclose(models[1]["w"].numpy(), (1.0 * 10 + 2.0 * 30) / 40) and models[1]["w"].dtype == torch.float32
    assert len(history.rejects) == 1 and "NaN" in history.rejects[0]["reason"]
    rng = np.random.default_rng(0)
    replies = [{"w": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(5)]
    weights = [int(n) for n in rng.integers(1, 100, size=5)]
    ours = AggregationRule("fedavg").aggregate(replies, weights, {"w": np.zeros((3, 4), np.float32)})
    theirs = aggregate_arrayrecords(
        [RecordDict({"a": ArrayRecord({"w": torch.from_numpy(r["w"])}), "m": MetricRecord({"n": n})})
         for r, n in zip(replies, weights)], "n")
    assert np.allclose(ours["w"], theirs["w"].numpy(), atol=1e-6)


def test_update_norm_bound_and_payload_limit_drop_replies_with_their_reason():
    specs, reference = array_specs(ArrayRecord(GLOBAL)), {k: v.numpy() for k, v in GLOBAL.items()}
    near, far = content(0.5), content(2.0)  # update norms sqrt(6) * 0.5 = 1.22 and 4.9
    assert validate_reply(near, specs, 1000, max_update_norm=2.0, reference=reference) is None
    reason = validate_reply(far, specs, 1000, max_update_norm=2.0, reference=reference)
    assert "update norm 4.899 exceeds --max-update-norm 2" in reason
    assert "exceeds the limit" in validate_reply(near, specs, 1000, max_reply_bytes=100)
    assert validate_reply(near, specs, 1000, max_reply_bytes=10_000) is None


def test_a_bounded_strategy_aggregates_only_updates_within_the_norm():
    models, history, _ = run_rounds(lambda i, r: content(1000.0 if i == 0 else 1.0), 3, 1, max_update_norm=10.0)
    assert torch.equal(models[1]["w"], torch.ones(2, 2))
    assert [r["node"] for r in history.rejects] == [1] and "update norm" in history.rejects[0]["reason"]


def test_a_node_is_excluded_after_n_rejects_counted_in_the_run_folder(tmp_path, caplog):
    poisoned = RecordDict({"arrays": ArrayRecord({**GLOBAL, "w": torch.full((2, 2), float("nan"))}),
                           "metrics": MetricRecord({"num-examples": 10})})
    with caplog.at_level(logging.WARNING, logger="fedtide"):
        models, history, asked = run_rounds(lambda i, r: poisoned if i == 1 else content(1.0), 3, 4, exclude_after=2)
    assert {p for r, p in asked if r >= 3} == {0, 2}  # partition 1 (node 2) no longer sampled
    assert {p for r, p in asked if r <= 2} == {0, 1, 2}
    assert sum("excluded after 2 rejected replies" in m for m in caplog.messages) == 1
    assert history.rounds[1].excluded == [2] and "excluded" not in history.rounds[2].as_json()
    folder = RunFolder(tmp_path / "run")
    for record in history.rounds:
        folder.append_round(record)
    tally = json.loads((tmp_path / "run" / "node_rejects.json").read_text())
    assert tally == {"2": {"rejects": 2, "excluded_round": 2, "last_reasons": [
        {"round": 1, "reason": "array 'w' holds NaN or Inf"}, {"round": 2, "reason": "array 'w' holds NaN or Inf"}]}}
    assert torch.equal(models[4]["w"], torch.ones(2, 2))


def test_a_round_that_cannot_satisfy_multikrum_keeps_the_global_model_and_says_so(caplog):
    bad = RecordDict({"metrics": MetricRecord({"num-examples": 10})})
    replies_of = lambda i, r: bad if (r == 2 and i < 2) else content(float(r))  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="fedtide"):
        models, history, _ = run_rounds(replies_of, 5, 2, rule=AggregationRule("multikrum", tolerated_attackers=1))
    assert torch.equal(models[1]["w"], torch.ones(2, 2))
    assert torch.equal(models[2]["w"], models[1]["w"])  # round 2: 3 valid replies, 5 needed
    note = history.rounds[1].as_json()["aggregation"]
    assert note["rule"] == "multikrum" and "needs more than 4 valid replies, got 3" in note["skipped"]
    assert "aggregation" not in history.rounds[0].as_json()
    assert any("global model stays as it was" in m for m in caplog.messages)


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed-mean", "multikrum", "clip"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_fuzzed_replies_never_crash_or_poison_any_rule(rule, strategy):
    config = RunConfig.of(clients=10, aggregation=rule, clip_norm=5.0 if rule == "clip" else 0.0, strategy=strategy)
    history = RunHistory(TaskSchedule.build(num_tasks=1, rounds_per_task=10, clients=10, spread=0, seed=0))
    rng = np.random.default_rng(0)
    global_arrays = {"w": rng.normal(size=(6, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    replies = fuzz_replies(global_arrays, 100, seed=3)
    result = run_fuzz(run_strategy(config, history), global_arrays, [c for _, c in replies], per_round=10)
    assert (result.crashes, result.non_finite) == (0, 0), result.errors
    assert result.replies == 100 and 0 < result.accepted < 100


def test_fuzzed_replies_never_crash_or_poison_clustered_training():
    config = RunConfig.of(clients=10, scenario="distributed-drift", num_tasks=2, training="clustered")
    history = RunHistory(TaskSchedule.build(num_tasks=1, rounds_per_task=10, clients=10, spread=0, seed=0))
    rng = np.random.default_rng(1)
    global_arrays = {"w": rng.normal(size=(6, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    replies = fuzz_replies(global_arrays, 150, seed=5)
    strategy = run_strategy(config, history)
    result = run_fuzz(strategy, global_arrays, [c for _, c in replies], per_round=10)
    assert (result.crashes, result.non_finite) == (0, 0), result.errors
    assert result.replies == 150 and 0 < result.accepted < 150
    assert 1 <= len(strategy.clusters.models) <= config.server.max_clusters
    assert all(np.isfinite(a.numpy()).all() for m in strategy.clusters.models.values() for a in m.values())


# ---- fault injection ----------------------------------------------------------------
def attacked(attack: str, partition: int = 0, **settings) -> tuple[dict, TrainOutcome, TrainOutcome]:
    config = RunConfig.of(attack=attack, attackers=1, **settings)
    received = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    honest = TrainOutcome(
        weights={"w": torch.ones(2, 3) + 0.5, "b": torch.full((3,), -0.25)}, metrics={"num-examples": 40}, state={}
    )
    return received, honest, FaultInjection(config.faults).reply(config.client, partition, 1, received, honest)


def test_sign_flip_sends_the_update_reversed():
    g, honest, sent = attacked("sign-flip")
    for name in g:
        assert torch.allclose(sent.weights[name], g[name] - (honest.weights[name] - g[name]))


def test_scale_multiplies_the_update():
    g, honest, sent = attacked("scale", attack_scale=10.0)
    assert torch.allclose(sent.weights["w"], torch.full((2, 3), 6.0))  # 1 + 10 * 0.5
    assert torch.allclose(sent.weights["b"], torch.full((3,), -2.5))


def test_noise_is_seeded_and_has_the_asked_spread():
    _, honest, first = attacked("noise", attack_noise_std=2.0)
    _, _, again = attacked("noise", attack_noise_std=2.0)
    assert torch.equal(first.weights["w"], again.weights["w"])
    noise = torch.cat([(first.weights[n] - honest.weights[n]).ravel() for n in honest.weights])
    assert 0.5 < float(noise.std()) < 4.0 and not torch.equal(first.weights["w"], honest.weights["w"])


@pytest.mark.parametrize("attack, check", [
    ("nan", lambda o: torch.isnan(o.weights["w"]).all()),
    ("inf", lambda o: torch.isinf(o.weights["b"]).all()),
    ("wrong-shape", lambda o: tuple(o.weights["w"].shape) == (3, 3)),
    ("lie-num-examples", lambda o: o.metrics["num-examples"] == 400),
])
def test_broken_replies_are_broken_as_asked(attack, check):
    assert check(attacked(attack)[2])


def test_honest_clients_and_label_flip_leave_the_reply_alone():
    _, honest, sent = attacked("sign-flip", partition=1)
    assert sent is honest
    _, honest, sent = attacked("label-flip")
    assert sent is honest  # label-flip poisons the data before training instead
    flipped = poison_labels(LabelledSplit(torch.zeros(3, 1), torch.tensor([0, 3, 9])), num_classes=10)
    assert flipped.y.tolist() == [9, 6, 0]


def test_vectorised_training_declines_label_flip_and_attacks_per_node_after():
    config = RunConfig.of(clients=2, num_tasks=1, iid=True, method="naive", local_epochs=1, attack="sign-flip", attackers=1)
    weights = ArrayRecord(build_model("mlp", (1, 8, 8), 10, config.network.hidden_widths, 0).state_dict())

    def messages(cfg: RunConfig):
        record = ConfigRecord({**cfg.client.to_mapping(), "server-round": 1})
        content = RecordDict({"arrays": weights, "config": record})
        return [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN) for n in (1, 2)]

    def contexts():
        return [Context(run_id=1, node_id=n, node_config={"partition-id": n - 1}, state=RecordDict(), run_config={})
                for n in (1, 2)]

    InProcessGrid(None, [])  # sets the run identity messages need
    flipping = config.replace(attack="label-flip")
    assert faulty_train_many(flipping.faults)(messages(flipping), contexts()) is None
    attacked_replies = faulty_train_many(config.faults)(messages(config), contexts())
    honest_replies = train_many(messages(config), contexts())  # the plain ClientApp: no fault injection
    assert attacked_replies is not None and honest_replies is not None  # equal iid shares: one computation
    g = weights.to_torch_state_dict()
    sent = attacked_replies[0].content["arrays"].to_torch_state_dict()
    honest = honest_replies[0].content["arrays"].to_torch_state_dict()
    assert all(torch.allclose(sent[n], 2 * g[n] - honest[n], atol=1e-6) for n in g)
    other = attacked_replies[1].content["arrays"].to_torch_state_dict()
    assert all(torch.equal(other[n], honest_replies[1].content["arrays"].to_torch_state_dict()[n]) for n in g)


@pytest.mark.slow  # four short runs: ~30 s on 2 idle cores
def test_the_default_bound_and_median_withstand_a_scaling_attacker_that_breaks_plain_fedavg(tmp_path):
    base = RunConfig.of(clients=6, num_tasks=1, rounds_per_task=4, local_epochs=1, iid=True, method="naive", quiet=True)
    attack = dict(attack="scale", attackers=1, attack_scale=-10.0)
    unbounded = dict(weight_cap=0, norm_cap=0, norm_outlier=0)
    clean = run_inprocess(base.replace(out=str(tmp_path / "clean")))["acc"]
    broken = run_inprocess(base.replace(out=str(tmp_path / "fedavg"), **attack, **unbounded))["acc"]
    bounded = run_inprocess(base.replace(out=str(tmp_path / "bounded"), **attack))["acc"]
    robust = run_inprocess(base.replace(out=str(tmp_path / "median"), aggregation="median", **attack, **unbounded))["acc"]
    assert clean > 0.6
    assert broken < 0.25  # one client of six drags the plain mean model to chance
    assert bounded > broken + 0.2  # the default caps bound its pull: learning slows, it does not collapse
    assert robust > clean - 0.2 and robust > broken + 0.3


def _reply(arrays: dict[str, np.ndarray], num_examples: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                       "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.5})})


def test_a_lying_client_moves_the_global_model_at_most_twice_the_median_update():
    """Regression: one client claiming the cap of num-examples with a replacement model
    took over FedAvg. Far away, the replacement is dropped as an outlier; within the outlier
    ratio, it is cut to twice the median update and weighs twice the median claim."""
    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(20, 10)).astype(np.float32), "b": np.zeros(10, np.float32)}
    honest = [{k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in g.items()} for _ in range(9)]
    median_honest = float(np.median([update_norm(r, g) for r in honest]))
    far = {k: np.full_like(v, -50.0) for k, v in g.items()}
    direction = {k: far[k] - g[k] for k in g}
    near = {k: g[k] + direction[k] * (4.5 * median_honest / update_norm(far, g)) for k in g}  # 4.5x the median
    for replacement, accepted, capped in [(far, 9, {"weights": 0, "updates": 0}), (near, 10, {"weights": 1, "updates": 1})]:
        strategy = run_strategy(RunConfig.of(clients=10), RunHistory(TaskSchedule.build(1, 1, 10, 0, 0)))
        replies = [_reply(r, 600) for r in honest] + [_reply(replacement, 1_000_000)]
        result = run_fuzz(strategy, g, replies, per_round=10)
        assert result.accepted == accepted and result.crashes == 0
        assert update_norm(result.last_global, g) <= 2 * median_honest
        record = strategy.history.rounds[0]
        assert record.capped == ({} if capped["weights"] == 0 else capped)
        assert [r["reason"] for r in record.rejected if "--norm-outlier" in r["reason"]] == ([] if accepted == 10 else
                                                                                           [record.rejected[0]["reason"]])


def test_backdoor_plants_a_corner_trigger_then_boosts_and_claims_as_told():
    data = LabelledSplit(torch.rand(6, 1, 8, 8), torch.tensor([1, 2, 3, 4, 5, 6]))
    planted = plant_backdoor(data)
    assert planted.y.tolist() == [0, 2, 0, 4, 0, 6]
    assert (planted.x[0, 0, -2:, -2:] == data.x.max()).all() and torch.equal(planted.x[1], data.x[1])
    config = RunConfig.of(clients=2, attack="backdoor", attackers=1, attack_scale=5.0, attack_claim=1000)
    injection = FaultInjection(config.faults)
    assert injection.poison(config.client, 0, 1) is plant_backdoor and injection.poison(config.client, 1, 1) is None
    honest = TrainOutcome(weights={"v": torch.ones(3)}, metrics={"num-examples": 7}, state={})
    sent = injection.reply(config.client, 0, 1, {"v": torch.zeros(3)}, honest)
    assert torch.equal(sent.weights["v"], torch.full((3,), 5.0)) and sent.metrics["num-examples"] == 1000
    assert injection.reply(config.client, 1, 1, {"v": torch.zeros(3)}, honest) is honest
