"""Check every client reply before it can reach aggregation.

Flower's strategies trust replies: one NaN, a wrong shape or a huge ``num-examples``
poisons the global model or crashes the run. ``validate_reply`` returns the reason a
reply must be dropped, or None when it is safe to aggregate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from server.robust import update_norm

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
WEIGHT_KEY = "num-examples"


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
        content, expected, max_num_examples, max_reply_bytes=max_reply_bytes, max_update_norm=max_update_norm,
        reference=reference,
    )[0]


def validate_and_decode(
    content: RecordDict,
    expected: dict[str, ArraySpec],
    max_num_examples: int,
    *,
    max_reply_bytes: int = 0,
    max_update_norm: float = 0.0,
    reference: dict[str, np.ndarray] | None = None,
) -> tuple[str | None, dict[str, np.ndarray] | None]:
    """``validate_reply``'s reason, and for a valid reply its arrays as decoded for the
    checks, so that aggregation does not decode them a second time."""
    try:
        outcome = _validate(content, expected, max_num_examples, max_reply_bytes, max_update_norm, reference)
    except Exception as err:  # whatever a client sends must not crash the server
        return f"malformed reply: {type(err).__name__}: {err}", None
    return (outcome, None) if isinstance(outcome, str) else (None, outcome)


def payload_bytes(content: RecordDict) -> int:
    """Bytes a reply carries: its arrays' data plus 8 per metric or config value."""
    size = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    for record in [*content.metric_records.values(), *content.config_records.values()]:
        for value in record.values():
            size += 8 * len(value) if isinstance(value, (list, str, bytes)) else 8
    return size


def _validate(content, expected, max_num_examples, max_reply_bytes, max_update_norm, reference):
    """A reason (str), or the decoded arrays of a valid reply."""
    if max_reply_bytes > 0 and (size := payload_bytes(content)) > max_reply_bytes:
        return f"payload of {size / 2**20:.2f} MiB exceeds the limit of {max_reply_bytes / 2**20:.2f} MiB"
    if list(content.array_records) != [ARRAYS_KEY]:
        return f"expected one array record '{ARRAYS_KEY}', got {sorted(content.array_records)}"
    if list(content.metric_records) != [METRICS_KEY]:
        return f"expected one metric record '{METRICS_KEY}', got {sorted(content.metric_records)}"
    reason = check_metrics(content.metric_records[METRICS_KEY], max_num_examples)
    if reason:
        return reason
    arrays = content.array_records[ARRAYS_KEY]
    names = set(arrays.keys())
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        return f"array names differ from the global model's (missing {missing}, unexpected {extra})"
    decoded: dict[str, np.ndarray] = {}
    for name, spec in expected.items():
        array = arrays[name]
        if tuple(array.shape) != spec.shape or str(array.dtype) != spec.dtype:
            return (
                f"array '{name}' is {array.dtype}{list(array.shape)}, "
                f"expected {spec.dtype}{list(spec.shape)}"
            )
        try:
            values = array.numpy()
        except Exception as err:  # malformed bytes must not crash the server
            return f"array '{name}' cannot be decoded: {err}"
        if values.shape != spec.shape:
            return f"array '{name}' decodes to shape {values.shape}, expected {spec.shape}"
        if not np.isfinite(values).all():
            return f"array '{name}' holds NaN or Inf"
        decoded[name] = values
    if max_update_norm > 0 and reference is not None:
        norm = update_norm(decoded, reference)
        if norm > max_update_norm:
            return f"update norm {norm:.4g} exceeds --max-update-norm {max_update_norm:g}"
    return decoded


DRIFT_KEY = "drift-detected"


def check_metrics(metrics: MetricRecord, max_num_examples: int) -> str | None:
    """The reason a reply's metrics are unusable (bad weight, non-finite value), or None."""
    reason = _check_num_examples(metrics.get(WEIGHT_KEY), max_num_examples)
    if reason:
        return reason
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        try:
            finite = all(math.isfinite(float(v)) for v in values)
        except (OverflowError, TypeError, ValueError):  # e.g. an int too large for a float
            finite = False
        if not finite:
            return f"metric '{key}' is not finite"
    if metrics.get(DRIFT_KEY, 0) not in (0, 1):  # a flag: drift reactions and the drift log read it alike
        return f"metric '{DRIFT_KEY}' must be 0 or 1, got {metrics.get(DRIFT_KEY)}"
    return None


def _check_num_examples(value: object, max_num_examples: int) -> str | None:
    if value is None:
        return f"metric '{WEIGHT_KEY}' is missing"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"'{WEIGHT_KEY}' must be a number, got {type(value).__name__}"
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return f"'{WEIGHT_KEY}' must be a whole number, got {value}"
    if not 0 < value <= max_num_examples:
        return f"'{WEIGHT_KEY}' = {value} is outside 1..{max_num_examples}"
    return None


class ReplyValidator:
    """The checks of ``validate_and_decode`` with the run's limits, against the round's global
    model: the first model it sees fixes the names, shapes and dtypes for the whole run."""

    def __init__(self, max_num_examples: int, max_update_norm: float = 0.0, max_reply_mb: float = 0.0) -> None:
        self.max_num_examples = max_num_examples
        self.max_update_norm = max_update_norm
        self.max_reply_bytes = int(max_reply_mb * 2**20)
        self.expected: dict[str, ArraySpec] = {}
        self._reference: dict[str, np.ndarray] | None = None

    def start_round(self, global_arrays: ArrayRecord) -> None:
        if not self.expected:
            self.expected = array_specs(global_arrays)
        if self.max_update_norm > 0:
            self._reference = {name: array.numpy() for name, array in global_arrays.items()}

    def check(self, content: RecordDict) -> tuple[str | None, dict[str, np.ndarray] | None]:
        """(reason to drop, None) or (None, the reply's decoded arrays)."""
        return validate_and_decode(
            content, self.expected, self.max_num_examples, max_reply_bytes=self.max_reply_bytes,
            max_update_norm=self.max_update_norm, reference=self._reference,
        )

    def check_evaluation(self, content: RecordDict) -> bool:
        """Whether an evaluation reply's metrics may be aggregated."""
        metrics = content.metric_records.get(METRICS_KEY)
        return metrics is not None and check_metrics(metrics, self.max_num_examples) is None
