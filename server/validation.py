"""Check every client reply before it can reach aggregation.

Flower's strategies trust replies: one NaN, a wrong shape or a huge ``num-examples``
poisons the global model or crashes the run. ``validate_reply`` returns the reason a
reply must be dropped, or None when it is safe to aggregate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from server.reply_metrics import ReplyMetrics
from server.robust import update_norm

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str


def array_specs(arrays: ArrayRecord) -> dict[str, ArraySpec]:
    """Names, shapes and dtypes of the global model a reply must match."""
    return {name: ArraySpec(tuple(a.shape), str(a.dtype)) for name, a in arrays.items()}


def validate_reply(
    content: RecordDict,
    expected: dict[str, ArraySpec],
    max_num_examples: int,
    *,
    max_reply_bytes: int = 0,
    max_update_norm: float = 0.0,
    reference: dict[str, np.ndarray] | None = None,
) -> str | None:
    """The reason to drop this training reply, or None if it may be aggregated.

    ``max_reply_bytes`` > 0 bounds the payload (checked first, before anything is decoded);
    ``max_update_norm`` > 0 bounds the L2 norm of the reply's weights minus ``reference``,
    the current global model. Never raises: a reply that breaks the checks themselves is
    dropped as malformed."""
    return validate_and_decode(
        content, expected, ReplyMetrics(max_num_examples), max_reply_bytes=max_reply_bytes,
        max_update_norm=max_update_norm, reference=reference,
    ).reason


@dataclass(frozen=True)
class Verdict:
    """What validation made of a reply: the reason to drop it, or its decoded arrays and its
    metrics as the schema keeps them (``dropped``: unknown metric names left out)."""

    reason: str | None
    arrays: dict[str, np.ndarray] | None = None
    metrics: dict[str, int | float] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()


def validate_and_decode(
    content: RecordDict,
    expected: dict[str, ArraySpec],
    schema: ReplyMetrics,
    *,
    max_reply_bytes: int = 0,
    max_update_norm: float = 0.0,
    reference: dict[str, np.ndarray] | None = None,
) -> Verdict:
    """``validate_reply``'s verdict with the decoded arrays of a valid reply, so that
    aggregation does not decode them a second time."""
    try:
        return _validate(content, expected, schema, max_reply_bytes, max_update_norm, reference)
    except Exception as err:  # whatever a client sends must not crash the server
        return Verdict(f"malformed reply: {type(err).__name__}: {str(err)[:200]!r}")


def payload_bytes(content: RecordDict) -> int:
    """Bytes a reply carries: its arrays' data plus 8 per metric or config value."""
    size = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    for record in [*content.metric_records.values(), *content.config_records.values()]:
        for value in record.values():
            size += 8 * len(value) if isinstance(value, (list, str, bytes)) else 8
    return size


def _validate(content, expected, schema, max_reply_bytes, max_update_norm, reference) -> Verdict:
    if max_reply_bytes > 0 and (size := payload_bytes(content)) > max_reply_bytes:
        return Verdict(f"payload of {size / 2**20:.2f} MiB exceeds the limit of {max_reply_bytes / 2**20:.2f} MiB")
    if list(content.array_records) != [ARRAYS_KEY]:
        return Verdict(f"expected one array record '{ARRAYS_KEY}', got {_names(content.array_records)}")
    if list(content.metric_records) != [METRICS_KEY]:
        return Verdict(f"expected one metric record '{METRICS_KEY}', got {_names(content.metric_records)}")
    metrics = schema.clean(content.metric_records[METRICS_KEY])
    if metrics.reason:
        return Verdict(metrics.reason)
    arrays = content.array_records[ARRAYS_KEY]
    names = set(arrays.keys())
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        return Verdict(f"array names differ from the global model's (missing {_names(missing)}, "
                       f"unexpected {_names(extra)})")
    decoded: dict[str, np.ndarray] = {}
    for name, spec in expected.items():
        array = arrays[name]
        if tuple(array.shape) != spec.shape or str(array.dtype) != spec.dtype:
            return Verdict(
                f"array '{name}' is {str(array.dtype)[:20]!r}{list(array.shape)[:8]}, "
                f"expected {spec.dtype}{list(spec.shape)}"
            )
        try:
            values = array.numpy()
        except Exception as err:  # malformed bytes must not crash the server
            return Verdict(f"array '{name}' cannot be decoded: {type(err).__name__}")
        if values.shape != spec.shape:
            return Verdict(f"array '{name}' decodes to shape {values.shape}, expected {spec.shape}")
        if not np.isfinite(values).all():
            return Verdict(f"array '{name}' holds NaN or Inf")
        decoded[name] = values
    if max_update_norm > 0 and reference is not None:
        norm = update_norm(decoded, reference)
        if norm > max_update_norm:
            return Verdict(f"update norm {norm:.4g} exceeds --max-update-norm {max_update_norm:g}")
    return Verdict(None, decoded, metrics.metrics, metrics.dropped)


def _names(names) -> str:
    """A client's names for a reason: quoted (no control characters reach a log) and few."""
    names = sorted(names)
    shown = ", ".join(repr(str(n)[:40]) for n in names[:5])
    return f"[{shown}{', ...' if len(names) > 5 else ''}]"


def check_metrics(metrics: MetricRecord, max_num_examples: int) -> str | None:
    """The reason a reply's metrics are unusable (see ``server.reply_metrics``), or None."""
    return ReplyMetrics(max_num_examples).clean(metrics).reason


class ReplyValidator:
    """The checks of ``validate_and_decode`` with the run's limits, against the round's global
    model: the first model it sees fixes the names, shapes and dtypes for the whole run."""

    def __init__(self, max_num_examples: int, max_update_norm: float = 0.0, max_reply_mb: float = 0.0,
                 schema: ReplyMetrics | None = None) -> None:
        self.max_num_examples = max_num_examples
        self.schema = schema or ReplyMetrics(max_num_examples)
        self.max_update_norm = max_update_norm
        self.max_reply_bytes = int(max_reply_mb * 2**20)
        self.expected: dict[str, ArraySpec] = {}
        self._reference: dict[str, np.ndarray] | None = None

    def start_round(self, global_arrays: ArrayRecord) -> None:
        if not self.expected:
            self.expected = array_specs(global_arrays)
        if self.max_update_norm > 0:
            self._reference = {name: array.numpy() for name, array in global_arrays.items()}

    def check(self, content: RecordDict, reference: dict[str, np.ndarray] | None = None) -> Verdict:
        """``reference``: the model the reply's update is measured from, when it is not the
        round's global model (clustered training)."""
        return validate_and_decode(
            content, self.expected, self.schema, max_reply_bytes=self.max_reply_bytes,
            max_update_norm=self.max_update_norm,
            reference=reference if reference is not None and self.max_update_norm > 0 else self._reference,
        )

    def check_evaluation(self, content: RecordDict) -> dict[str, int | float] | None:
        """An evaluation reply's metrics as the schema keeps them, or None when they may not
        be aggregated."""
        try:
            if list(content.metric_records) != [METRICS_KEY]:
                return None
            metrics = self.schema.clean(content.metric_records[METRICS_KEY])
        except Exception:  # whatever a client sends must not crash the server
            return None
        return metrics.metrics if metrics.reason is None else None


_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[\\/][^\s'\"]*")


def client_error(code: int, reason: str, limit: int = 160) -> str:
    """A failed client's error for the server's log and run folder: its first line, with
    paths on the device blanked (they are the device's business), control characters
    escaped and the length bounded."""
    first = str(reason).strip().splitlines()[0] if str(reason).strip() else "no reason given"
    text = _PATH.sub("<path>", first)
    text = text.encode("unicode_escape").decode("ascii")
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{text} (error code {code})"
