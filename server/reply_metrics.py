"""The schema of a reply's metrics: what a client may report, and within which bounds.

A reply's metrics reach the run's history, ``metrics.jsonl``, the drift log, the drift
reactions and the summary, so each is the client's word and is checked like its weights:

- a **known** metric (``METRICS``) must be a single number of its kind (a whole number, a
  0/1 flag or a finite float) within its range; otherwise the whole reply is dropped, with the
  reason (a client that lies about one figure is not trusted with the others);
- an **unknown** metric is dropped from the reply, and the drop is logged (a plain Flower
  client's own metrics included: declare them with ``ReplyMetrics(extra=...)`` to keep them);
- a missing metric is fine, except ``num-examples``, which every Flower reply carries.

``task-id`` is bounded by the run's number of tasks when the server knows it. Names are
never trusted either: they are logged as ``repr`` and cut, so a key cannot forge a log line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config import (
    CHOICE_KEY, DP_SPENT_KEY, HELD_VERSION_KEY, LOSS_KEY, LOSSES_KEY, MAX_CLUSTERS, MAX_LOSS, RELEASED_ACC_KEY,
    SAMPLE_EPSILON_KEY,
)

WEIGHT_KEY = "num-examples"
SPENT = "privacy budget spent"  # why a reply marked dp-spent is dropped
DRIFT_KEY = "drift-detected"
LARGE = 10**12  # counts and stream positions: far beyond any device, far below float precision


@dataclass(frozen=True)
class MetricSpec:
    """One metric's kind (``int``, ``flag``, ``float``, or ``floats``: a list of at most
    ``length`` floats) and its closed range."""

    kind: str
    minimum: float
    maximum: float
    length: int = 0

    def check(self, name: str, value: object) -> tuple[str | None, Any]:
        """(reason, None) for a bad value, else (None, the value as its kind)."""
        if self.kind == "floats":
            if not isinstance(value, list) or not 0 < len(value) <= self.length:
                return f"metric '{name}' must be a list of 1 to {self.length} numbers", None
            item = MetricSpec("float", self.minimum, self.maximum)
            checked = []
            for entry in value:
                reason, number = item.check(name, entry)
                if reason is not None:
                    return reason, None
                checked.append(number)
            return None, checked
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric '{name}' must be a number, got {type(value).__name__}", None
        if isinstance(value, float) and not math.isfinite(value):
            return f"metric '{name}' is not finite", None
        if self.kind in ("int", "flag"):
            if isinstance(value, float) and not value.is_integer():
                return f"metric '{name}' must be a whole number, got {value:g}", None
            value = int(value)
        if not self.minimum <= value <= self.maximum:
            if self.kind == "flag":
                return f"metric '{name}' must be 0 or 1, got {_short(value)}", None
            return f"metric '{name}' = {_short(value)} is outside {self.minimum:g}..{self.maximum:g}", None
        return None, value if self.kind != "float" else float(value)


def _short(value: int | float) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else text[:10] + "..." + text[-4:] + f" ({len(text)} digits)"


METRICS: dict[str, MetricSpec] = {
    WEIGHT_KEY: MetricSpec("int", 1, LARGE),  # narrowed to --max-num-examples by ReplyMetrics
    "train-loss": MetricSpec("float", 0.0, MAX_LOSS),
    "prequential-acc": MetricSpec("float", 0.0, 1.0),
    "task-id": MetricSpec("int", 0, 10_000),  # narrowed to the run's tasks when known
    "lr": MetricSpec("float", 0.0, 1e6),
    "local-epochs": MetricSpec("int", 0, 10**6),
    DRIFT_KEY: MetricSpec("flag", 0, 1),
    "drift-position": MetricSpec("int", -1, LARGE),
    "pre-acc": MetricSpec("float", 0.0, 1.0),  # the received model on the new data, before training
    "new-files": MetricSpec("int", 0, LARGE),
    "new-examples": MetricSpec("int", 0, LARGE),
    "quarantined": MetricSpec("int", 0, LARGE),
    "eval-acc": MetricSpec("float", 0.0, 1.0),
    "eval-loss": MetricSpec("float", 0.0, MAX_LOSS),
    # clustered training (server.clusters): the model trained, and the loss of the best two before
    CHOICE_KEY: MetricSpec("int", 0, LARGE),
    LOSS_KEY: MetricSpec("float", 0.0, MAX_LOSS),
    LOSSES_KEY: MetricSpec("floats", 0.0, MAX_LOSS, length=MAX_CLUSTERS),
    # an edge client's released model (server.release_delivery): the version it holds, its accuracy
    HELD_VERSION_KEY: MetricSpec("int", 0, LARGE),
    RELEASED_ACC_KEY: MetricSpec("float", 0.0, 1.0),
    # --dp sample (client.dp_sgd): the client's epsilon so far; 1 when its budget stopped it
    SAMPLE_EPSILON_KEY: MetricSpec("float", 0.0, 1e6),
    DP_SPENT_KEY: MetricSpec("flag", 0, 1),
}


@dataclass(frozen=True)
class CleanMetrics:
    """A reply's metrics after the schema: the reason to drop the reply, or the metrics
    kept and the names of those dropped."""

    reason: str | None
    metrics: dict[str, int | float]
    dropped: tuple[str, ...] = ()


class ReplyMetrics:
    """The schema with a run's bounds: ``max_num_examples``, and ``num_tasks`` when the server
    knows it; ``extra`` declares more metrics to keep (e.g. your own client's ``accuracy``)."""

    def __init__(self, max_num_examples: int, num_tasks: int | None = None,
                 extra: Mapping[str, MetricSpec] | None = None) -> None:
        self.specs = dict(METRICS)
        self.specs[WEIGHT_KEY] = MetricSpec("int", 1, max_num_examples)
        if num_tasks is not None:
            self.specs["task-id"] = MetricSpec("int", 0, max(num_tasks - 1, 0))
        self.specs.update(extra or {})

    def clean(self, metrics: Mapping[str, Any]) -> CleanMetrics:
        if WEIGHT_KEY not in metrics:
            return CleanMetrics(f"metric '{WEIGHT_KEY}' is missing", {})
        kept: dict[str, int | float] = {}
        dropped: list[str] = []
        for name, value in metrics.items():
            spec = self.specs.get(name)
            if spec is None:
                dropped.append(name)
                continue
            reason, checked = spec.check(name, value)
            if reason is not None:
                return CleanMetrics(reason, {})
            kept[name] = checked
        if kept.get(DP_SPENT_KEY):  # its weights are the model it was sent: nothing to aggregate
            return CleanMetrics(f"{SPENT}: another round would pass --target-epsilon on this client", {})
        return CleanMetrics(None, kept, tuple(dropped))


def describe_dropped(names: tuple[str, ...], shown: int = 3) -> str:
    """The dropped metric names for a log line: quoted, cut, at most ``shown`` of them."""
    listed = ", ".join(repr(name[:40]) for name in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"unknown metric(s) dropped: {listed}{more}"
