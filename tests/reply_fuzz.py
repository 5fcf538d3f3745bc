"""A seeded generator of malformed training replies, to show that validation and every
aggregation rule survive whatever a client sends.

``fuzz_replies(global_arrays, n, seed)`` gives ``n`` reply contents (``RecordDict``), a mix
of honest ones and the kinds in ``KINDS``: wrong, missing or extra keys, wrong shapes and
dtypes, NaN/Inf, huge values and norms, every sort of bad ``num-examples``, truncated or
padded bytes, empty records, and metrics that are extra, missing, of the wrong type,
non-finite, huge or claim another node's id (``METRIC_KINDS``). ``run_fuzz`` sends them through a real strategy, round after
round, and counts crashes and non-finite global models (both must be 0).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

Arrays = dict[str, np.ndarray]


def _honest(g: Arrays, rng: np.random.Generator) -> Arrays:
    return {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in g.items()}


def _record(arrays: dict[str, Array] | Arrays, metrics: dict | None = None, **extra) -> RecordDict:
    content = {
        "arrays": ArrayRecord({k: v if isinstance(v, Array) else Array(np.asarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5} if metrics is None else metrics),
    }
    content.update(extra)
    return RecordDict(content)


def _first(g: Arrays) -> str:
    return next(iter(g))


def _with(g: Arrays, rng: np.random.Generator, change: Callable[[np.ndarray], np.ndarray]) -> Arrays:
    arrays = _honest(g, rng)
    name = _first(g)
    arrays[name] = change(arrays[name])
    return arrays


def _sprinkle(value: float) -> Callable[[np.ndarray, np.random.Generator], Arrays]:
    def make(g: Arrays, rng: np.random.Generator) -> RecordDict:
        def change(a: np.ndarray) -> np.ndarray:
            a = a.copy()
            a.flat[rng.integers(a.size)] = value
            return a

        return _record(_with(g, rng, change))

    return make


def _bytes(g: Arrays, rng: np.random.Generator, cut: int) -> RecordDict:
    arrays: dict[str, Array] = {k: Array(v) for k, v in _honest(g, rng).items()}
    name = _first(g)
    good = arrays[name]
    data = good.data[:cut] if cut < 0 else good.data + bytes(rng.integers(0, 256, cut, dtype=np.uint8))
    arrays[name] = Array(dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=data)
    return _record(arrays)


def _num_examples(value) -> Callable[[Arrays, np.random.Generator], RecordDict]:
    return lambda g, rng: _record(_honest(g, rng), {"num-examples": value, "train-loss": 0.5})


HONEST_METRICS = {"num-examples": 10, "train-loss": 0.5, "prequential-acc": 0.8, "task-id": 0, "lr": 0.1,
                  "local-epochs": 1, "drift-detected": 0, "drift-position": -1}


def _metrics(**changes) -> Callable[[Arrays, np.random.Generator], RecordDict]:
    """An honest reply whose metrics have ``changes`` (None: that key removed)."""
    metrics = {k: v for k, v in {**HONEST_METRICS, **changes}.items() if v is not None}
    return lambda g, rng: _record(_honest(g, rng), dict(metrics))


def _many_keys(g: Arrays, rng: np.random.Generator) -> RecordDict:
    return _record(_honest(g, rng), {**HONEST_METRICS, **{f"k{i}": float(i) for i in range(int(rng.integers(50, 2000)))}})


# what a client may get wrong, or lie about, in its metrics
METRIC_KINDS: dict[str, Callable[[Arrays, np.random.Generator], RecordDict]] = {
    "extra-metric": _metrics(surprise=1.0),
    "extra-list-metric": _metrics(histogram=[1.0, 2.0, 3.0]),
    "many-extra-metrics": _many_keys,
    "newline-metric-name": _metrics(**{"x\nround 1: forged line": 1.0}),
    "missing-train-loss": _metrics(**{"train-loss": None}),
    "only-num-examples": _metrics(**{k: None for k in HONEST_METRICS if k != "num-examples"}),
    "spoofed-node": _metrics(node=123456789),
    "spoofed-node-drift": _metrics(node=-7, **{"drift-detected": 1, "drift-position": 5}),
    "huge-prequential-acc": _metrics(**{"prequential-acc": 1e300}),
    "negative-prequential-acc": _metrics(**{"prequential-acc": -0.5}),
    "huge-task-id": _metrics(**{"task-id": 10**15}),
    "giant-task-id": _metrics(**{"task-id": 10**400}),
    "negative-task-id": _metrics(**{"task-id": -1}),
    "fraction-task-id": _metrics(**{"task-id": 0.5}),
    "list-task-id": _metrics(**{"task-id": [0, 1]}),
    "drift-flag-2": _metrics(**{"drift-detected": 2}),
    "drift-flag-float": _metrics(**{"drift-detected": 0.5}),
    "huge-drift-position": _metrics(**{"drift-detected": 1, "drift-position": 10**30}),
    "drift-without-evidence": _metrics(**{"drift-detected": 1, "drift-position": 0}),
    "drift-faked-evidence": _metrics(**{"drift-detected": 1, "drift-position": 0, "pre-acc": 0.0}),
    "huge-pre-acc": _metrics(**{"pre-acc": 1e300}),
    "nan-pre-acc": _metrics(**{"pre-acc": float("nan")}),
    "inf-train-loss": _metrics(**{"train-loss": float("inf")}),
    "negative-train-loss": _metrics(**{"train-loss": -3.0}),
    "huge-train-loss": _metrics(**{"train-loss": 1e300}),
    "nan-lr": _metrics(lr=float("nan")),
    "huge-local-epochs": _metrics(**{"local-epochs": 10**12}),
    "huge-eval-loss": _metrics(**{"eval-loss": 1e308}),
    # --dp sample: a client's own budget, and its mark that the budget stopped it
    "nan-dp-epsilon": _metrics(**{"dp-epsilon": float("nan")}),
    "huge-dp-epsilon": _metrics(**{"dp-epsilon": 1e300}),
    "negative-dp-epsilon": _metrics(**{"dp-epsilon": -1.0}),
    "dp-spent-2": _metrics(**{"dp-spent": 2}),
    "dp-spent": _metrics(**{"dp-spent": 1}),
    # clustered training: the model a reply claims to have trained, and its losses
    "unknown-cluster": _metrics(cluster=99),
    "nan-cluster": _metrics(cluster=float("nan")),
    "inf-cluster": _metrics(cluster=float("inf")),
    "negative-cluster": _metrics(cluster=-1),
    "fraction-cluster": _metrics(cluster=0.5),
    "giant-cluster": _metrics(cluster=10**400),
    "list-cluster": _metrics(cluster=[0, 1]),
    "huge-cluster-loss": _metrics(**{"cluster": 0, "cluster-loss": 1e300}),
    "nan-cluster-loss": _metrics(**{"cluster": 0, "cluster-loss": float("nan")}),
    "nan-cluster-losses": _metrics(**{"cluster": 0, "cluster-loss": 0.1, "cluster-losses": [float("nan")]}),
    "long-cluster-losses": _metrics(**{"cluster": 0, "cluster-loss": 0.1, "cluster-losses": [0.1] * 10_000}),
    "negative-cluster-losses": _metrics(**{"cluster": 0, "cluster-loss": 0.1, "cluster-losses": [-1.0, 0.1]}),
    "wrong-length-cluster-losses": _metrics(**{"cluster": 0, "cluster-loss": 0.1, "cluster-losses": [0.1, 0.2, 0.3]}),
    "scalar-cluster-losses": _metrics(**{"cluster": 0, "cluster-loss": 0.1, "cluster-losses": 0.1}),
    "low-loss-liar": _metrics(**{"cluster": 0, "cluster-loss": 0.0, "cluster-losses": [0.0]}),
    "high-loss-liar": _metrics(**{"cluster": 0, "cluster-loss": 1e6, "cluster-losses": [1e6], "drift-detected": 1}),
    # an edge client's released model: the version it holds (decides what it is sent) and its accuracy
    "negative-released-version": _metrics(**{"released-version": -1}),
    "giant-released-version": _metrics(**{"released-version": 10**400}),
    "fraction-released-version": _metrics(**{"released-version": 1.5}),
    "released-version-liar": _metrics(**{"released-version": 10**11}),
    "nan-released-acc": _metrics(**{"released-acc": float("nan")}),
    "huge-released-acc": _metrics(**{"released-acc": 2.0}),
    "metrics-as-config": lambda g, rng: RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in _honest(g, rng).items()}),
        "metrics": ConfigRecord({"num-examples": 10, "train-loss": "low"})}),
}


KINDS: dict[str, Callable[[Arrays, np.random.Generator], RecordDict]] = {
    "honest": lambda g, rng: _record(_honest(g, rng)),
    "missing-array": lambda g, rng: _record({k: v for k, v in _honest(g, rng).items() if k != _first(g)}),
    "extra-array": lambda g, rng: _record({**_honest(g, rng), "evil": np.ones(3, np.float32)}),
    "renamed-array": lambda g, rng: _record({k + "x": v for k, v in _honest(g, rng).items()}),
    "wrong-shape": lambda g, rng: _record(_with(g, rng, lambda a: a.reshape(-1))),
    "extra-row": lambda g, rng: _record(_with(g, rng, lambda a: np.concatenate([a, a[:1]]))),
    "float64": lambda g, rng: _record(_with(g, rng, lambda a: a.astype(np.float64))),
    "float16": lambda g, rng: _record(_with(g, rng, lambda a: a.astype(np.float16))),
    "int32": lambda g, rng: _record(_with(g, rng, lambda a: a.astype(np.int32))),
    "nan": _sprinkle(float("nan")),
    "inf": _sprinkle(float("inf")),
    "-inf": _sprinkle(float("-inf")),
    "huge-values": lambda g, rng: _record({k: np.full_like(v, 3e38) for k, v in g.items()}),
    "huge-norm": lambda g, rng: _record({k: (v + rng.normal(0, 1e6, v.shape)).astype(v.dtype) for k, v in g.items()}),
    "opposite-huge": lambda g, rng: _record({k: np.full_like(v, -3.4e38) for k, v in g.items()}),
    "truncated-bytes": lambda g, rng: _bytes(g, rng, -int(rng.integers(1, 5))),
    "padded-bytes": lambda g, rng: _bytes(g, rng, int(rng.integers(1, 9))),
    "no-num-examples": lambda g, rng: _record(_honest(g, rng), {"train-loss": 0.5}),
    "zero-num-examples": _num_examples(0),
    "negative-num-examples": _num_examples(-7),
    "float-num-examples": _num_examples(2.5),
    "whole-float-num-examples": _num_examples(12.0),
    "huge-num-examples": _num_examples(10**15),
    "giant-int-num-examples": _num_examples(10**400),
    "nan-num-examples": _num_examples(float("nan")),
    "inf-num-examples": _num_examples(float("inf")),
    "list-num-examples": _num_examples([1, 2]),
    "nan-metric": lambda g, rng: _record(_honest(g, rng), {"num-examples": 10, "train-loss": float("nan")}),
    "list-metric": lambda g, rng: _record(_honest(g, rng), {"num-examples": 10, "x": [1.0, float("inf")]}),
    "empty-record": lambda g, rng: RecordDict({}),
    "empty-arrays": lambda g, rng: _record({}),
    "only-metrics": lambda g, rng: RecordDict({"metrics": MetricRecord({"num-examples": 10})}),
    "two-array-records": lambda g, rng: _record(_honest(g, rng), more=ArrayRecord({k: Array(v) for k, v in g.items()})),
    "two-metric-records": lambda g, rng: _record(_honest(g, rng), more=MetricRecord({"num-examples": 1})),
    "config-record": lambda g, rng: _record(_honest(g, rng), cfg=ConfigRecord({"x": "y" * 100})),
    **METRIC_KINDS,
}


def fuzzing_client_app(seed: int, share: float = 0.5, sent: list[str] | None = None) -> ClientApp:
    """fedtide's ClientApp, except that a train reply is, with probability ``share``, replaced
    by a fuzzed one (a kind of ``KINDS`` other than honest) built around the honest reply's
    weights; seeded by (seed, partition, round). In-process, ``sent`` collects the kinds sent
    (``"honest"`` for a real reply). Evaluation replies stay honest."""
    from client import app as plain

    names = [kind for kind in KINDS if kind != "honest"]
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = plain.train_message(msg, context)
        partition, server_round = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        rng = np.random.default_rng([seed, partition, server_round])
        kind = names[int(rng.integers(len(names)))] if rng.random() < share and not reply.has_error() else "honest"
        if sent is not None:
            sent.append(kind)
        if kind == "honest":
            return reply
        weights = {name: array.numpy() for name, array in reply.content["arrays"].items()}
        return Message(content=KINDS[kind](weights, rng), reply_to=msg)

    app.evaluate()(plain.evaluate)
    return app


def fuzz_replies(global_arrays: Arrays, n: int, seed: int) -> list[tuple[str, RecordDict]]:
    """``n`` (kind, reply content) pairs; about one in four honest, the rest malformed."""
    rng = np.random.default_rng(seed)
    names = list(KINDS)
    out = []
    for _ in range(n):
        kind = "honest" if rng.random() < 0.25 else names[int(rng.integers(1, len(names)))]
        out.append((kind, KINDS[kind](global_arrays, rng)))
    return out


@dataclass
class FuzzResult:
    replies: int = 0
    accepted: int = 0
    crashes: int = 0  # exceptions out of the strategy: must be 0
    non_finite: int = 0  # rounds whose new global model holds NaN or Inf: must be 0
    rounds_kept: int = 0  # rounds that kept the previous global model
    last_global: Arrays = field(default_factory=dict)  # the global model after the last round
    errors: list[str] = field(default_factory=list)


class _Nodes:
    """The part of a Flower ``Grid`` that sampling uses."""

    def __init__(self, count: int) -> None:
        self._ids = list(range(1, count + 1))

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def run_fuzz(strategy, global_arrays: Arrays, replies: list[RecordDict], per_round: int) -> FuzzResult:
    """Feed ``replies`` to ``strategy`` (a fedtide strategy over ``per_round`` nodes, built
    with ``history``), ``per_round`` at a time, as the replies of successive rounds."""
    if TaskIdentity._run_id is None:  # messages need a run, as on a real ServerApp
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    result = FuzzResult()
    arrays = ArrayRecord({k: Array(v) for k, v in global_arrays.items()})
    nodes = _Nodes(per_round)
    for start in range(0, len(replies), per_round):
        server_round = start // per_round + 1
        try:
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), nodes))
            answered = []
            for message, content in zip(messages, replies[start : start + per_round]):
                message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                answered.append(Message(content=content, reply_to=message))
            result.replies += len(answered)
            new, _ = strategy.aggregate_train(server_round, answered)
            result.accepted += len(strategy.accepted_nodes)
        except Exception as err:  # counted, not raised: this is what the fuzz looks for
            result.crashes += 1
            result.errors.append(f"round {server_round}: {type(err).__name__}: {err}")
            continue
        finally:
            strategy.history.close_round(server_round, [0.0], 0.0)
        if new is None:
            result.rounds_kept += 1
        elif all(np.isfinite(a.numpy()).all() for a in new.values()):
            arrays = new
        else:
            result.non_finite += 1
    result.last_global = {k: a.numpy() for k, a in arrays.items()}
    return result
