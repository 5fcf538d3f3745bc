"""Every kind of bad reply is dropped with a reason; the good ones alone are aggregated."""

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtide.runtimes.inprocess import InProcessGrid

from common.schedule import TaskSchedule
from server.history import RunHistory
from server.sampling import NodeSampling
from server.strategy import FedtideStrategy
from server.validation import ReplyValidator
from server.validation import array_specs, validate_reply
from server.reply_metrics import MetricSpec, ReplyMetrics

GLOBAL = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
SPECS = array_specs(ArrayRecord(GLOBAL))


def reply(arrays=None, metrics=None, extra=None) -> RecordDict:
    arrays = {k: v + 1 for k, v in GLOBAL.items()} if arrays is None else arrays
    metrics = {"num-examples": 10, "train-loss": 0.5} if metrics is None else metrics
    content = {"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}
    content.update(extra or {})
    return RecordDict(content)


def test_a_well_formed_reply_passes():
    assert validate_reply(reply(), SPECS, max_num_examples=1000) is None


@pytest.mark.parametrize(
    "bad, words",
    [
        (reply(arrays={"w": torch.full((3, 2), float("nan")), "b": torch.zeros(2)}), "NaN or Inf"),
        (reply(arrays={"w": torch.full((3, 2), float("inf")), "b": torch.zeros(2)}), "NaN or Inf"),
        (reply(arrays={"w": torch.zeros(2, 3), "b": torch.zeros(2)}), "expected float32[3, 2]"),
        (reply(arrays={"w": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(2)}), "expected float32"),
        (reply(arrays={"w": torch.zeros(3, 2)}), "missing ['b']"),
        (reply(arrays={**GLOBAL, "evil": torch.zeros(1)}), "unexpected ['evil']"),
        (reply(metrics={"train-loss": 0.5}), "'num-examples' is missing"),
        (reply(metrics={"num-examples": 0}), "outside 1..1000"),
        (reply(metrics={"num-examples": -5}), "outside 1..1000"),
        (reply(metrics={"num-examples": 10**9}), "outside 1..1000"),
        (reply(metrics={"num-examples": 2.5}), "whole number"),
        (reply(metrics={"num-examples": float("nan")}), "not finite"),
        (reply(metrics={"num-examples": 10, "train-loss": float("nan")}), "'train-loss' is not finite"),
        (RecordDict({"metrics": MetricRecord({"num-examples": 10})}), "one array record"),
        (RecordDict({"arrays": ArrayRecord(GLOBAL)}), "one metric record"),
        (reply(extra={"more": ArrayRecord(GLOBAL)}), "one array record"),
    ],
)
def test_each_bad_kind_is_rejected_with_its_reason(bad, words):
    reason = validate_reply(bad, SPECS, max_num_examples=1000)
    assert reason is not None and words in reason


def _federation(contents: list[RecordDict]):
    """An in-process grid whose node i replies contents[i] (or raises, for None)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        content = contents[int(context.node_config["partition-id"])]
        if content is None:
            raise RuntimeError("client crashed")
        return Message(content=content, reply_to=msg)

    return InProcessGrid(app, [{"partition-id": i} for i in range(len(contents))])


def _one_round(contents):
    history = RunHistory(TaskSchedule.build(num_tasks=1, rounds_per_task=1, clients=len(contents), spread=0, seed=0))
    strategy = FedtideStrategy(
        history=history, validator=ReplyValidator(1000), sampling=NodeSampling(1.0, 0.0, len(contents), 60.0)
    )
    seen = {}

    def evaluate(server_round, arrays):
        seen[server_round] = arrays.to_torch_state_dict()
        history.close_round(server_round, [0.0], 0.0)

    strategy.start(_federation(contents), ArrayRecord(GLOBAL), num_rounds=1, evaluate_fn=evaluate)
    return seen[1], history


def test_strategy_aggregates_only_valid_replies_and_records_the_rest():
    good_a = reply(arrays={"w": torch.full((3, 2), 1.0), "b": torch.full((2,), 1.0)})
    good_b = reply(arrays={"w": torch.full((3, 2), 3.0), "b": torch.full((2,), 3.0)})
    poisoned = reply(arrays={"w": torch.full((3, 2), float("nan")), "b": torch.zeros(2)})
    liar = reply(metrics={"num-examples": 10**12})
    weights, history = _one_round([good_a, poisoned, good_b, liar, None])
    assert torch.allclose(weights["w"], torch.full((3, 2), 2.0))
    reasons = sorted(r["reason"] for r in history.rejects)
    assert len(reasons) == 3
    assert any("NaN" in r for r in reasons)
    assert any("outside" in r for r in reasons)
    assert any("client crashed" in r for r in reasons)


def test_a_round_where_every_reply_is_bad_keeps_the_global_model():
    bad = reply(arrays={"w": torch.zeros(1), "b": torch.zeros(2)})
    weights, history = _one_round([bad, None])
    assert torch.equal(weights["w"], GLOBAL["w"])
    assert len(history.rejects) == 2


def _train_round(contents, caplog=None):
    """One round of a FedtideStrategy over in-process nodes replying ``contents``; the
    strategy's history and the real node ids, in partition order."""
    grid = _federation(contents)
    history = RunHistory(TaskSchedule.build(num_tasks=2, rounds_per_task=1, clients=len(contents), spread=0, seed=0))
    strategy = FedtideStrategy(
        history=history, validator=ReplyValidator(1000, schema=ReplyMetrics(1000, num_tasks=2)),
        sampling=NodeSampling(1.0, 0.0, len(contents), 60.0),
    )

    def evaluate(server_round, arrays):
        history.close_round(server_round, [0.0, 0.0], 0.0)

    strategy.start(grid, ArrayRecord(GLOBAL), num_rounds=1, evaluate_fn=evaluate)
    return history, grid.get_node_ids()


def test_extra_or_missing_metrics_from_one_client_do_not_end_the_round(caplog):
    """Regression: one extra finite metric, or a missing train-loss, crashed aggregation."""
    honest = {"num-examples": 10, "train-loss": 0.5, "task-id": 0}
    contents = [reply(metrics=honest), reply(metrics={**honest, "surprise": 1.0}),
                reply(metrics={"num-examples": 10}), reply(metrics={**honest, "evil\nround 9: forged": 2})]
    history, nodes = _train_round(contents)
    record = history.rounds[0]
    assert not record.rejected and len(record.clients) == 4
    assert all("surprise" not in c and not any("evil" in k for k in c) for c in record.clients)
    assert record.train["train-loss"] == pytest.approx(0.5)
    dropped = [r.getMessage() for r in caplog.records if "unknown metric" in r.getMessage()]
    assert len(dropped) == 2 and all("\n" not in line for line in dropped)
    assert any("'evil\\nround 9: forged'" in line for line in dropped)


def test_a_client_cannot_claim_another_node_id_or_absurd_figures():
    """Regression: a "node" metric overrode the real id in metrics.jsonl and the drift log;
    prequential-acc 1e300 or task-id 1e15 reached the summary."""
    honest = {"num-examples": 10, "train-loss": 0.5, "task-id": 0, "drift-detected": 1, "drift-position": 3}
    contents = [reply(metrics={**honest, "node": 424242}), reply(metrics={**honest, "prequential-acc": 1e300}),
                reply(metrics={**honest, "task-id": 10**15}), reply(metrics={**honest, "task-id": 2}),
                reply(metrics={**honest, "drift-position": 2.5})]
    history, nodes = _train_round(contents)
    record = history.rounds[0]
    assert [c["node"] for c in record.clients] == [nodes[0]]
    assert [e["node"] for e in history.drift_events] == [nodes[0]]
    reasons = sorted(r["reason"] for r in record.rejected)
    assert len(reasons) == 4
    assert any("'prequential-acc' = 1e+300 is outside 0..1" in r for r in reasons)
    assert any("'task-id' = 1000000000000000 is outside 0..1" in r for r in reasons)
    assert any("'task-id' = 2 is outside 0..1" in r for r in reasons)
    assert any("'drift-position' must be a whole number" in r for r in reasons)


def test_the_schema_keeps_declared_metrics_and_checks_their_kind():
    schema = ReplyMetrics(100, extra={"accuracy": MetricSpec("float", 0, 1)})
    kept = schema.clean({"num-examples": 5.0, "accuracy": 0.5, "x": 1})
    assert kept.reason is None and kept.metrics == {"num-examples": 5, "accuracy": 0.5} and kept.dropped == ("x",)
    assert isinstance(kept.metrics["num-examples"], int)
    assert "must be a number" in schema.clean({"num-examples": 5, "accuracy": [0.5]}).reason
    assert "'accuracy' = 2 is outside 0..1" in schema.clean({"num-examples": 5, "accuracy": 2}).reason
    assert "digits" in schema.clean({"num-examples": 10**400}).reason  # cut, not 400 digits in a log line


def test_a_failed_client_keeps_its_paths_to_itself():
    from server.validation import client_error

    text = client_error(0, "<class 'FileNotFoundError'>:<'[Errno 2] No such file: /home/ana/secret/x.npz'>\nmore")
    assert "ana" not in text and "<path>" in text and "\n" not in text and "error code 0" in text
    assert len(client_error(0, "x" * 10_000)) < 200


def test_client_evaluation_is_checked_and_a_liar_weighs_at_most_twice_the_median():
    from types import SimpleNamespace

    history = RunHistory()
    strategy = FedtideStrategy(history=history, validator=ReplyValidator(10**6),
                               sampling=NodeSampling(1.0, 1.0, 4, 60.0))

    def evaluation(metrics):
        return SimpleNamespace(has_error=lambda: False, content=RecordDict({"metrics": MetricRecord(metrics)}))

    honest = [evaluation({"num-examples": 100, "eval-acc": 1.0}) for _ in range(3)]
    liar = evaluation({"num-examples": 10**6, "eval-acc": 0.0, "node": 5})
    absurd = evaluation({"num-examples": 100, "eval-acc": 7.0})
    metrics = strategy.aggregate_evaluate(1, [*honest, liar, absurd])
    assert metrics["eval-acc"] == pytest.approx(300 / 500)  # the liar's million counts as 200
    assert "node" not in metrics
