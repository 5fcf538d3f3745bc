"""The feature range of an edge client: the float values its data files may hold.

Finite but absurd values (1e30) train a model into NaN and linger in the replay memory, so
the inbox refuses a file with a value outside the range (``client.inbox_files``). No torch
here: ``fedtide client`` checks its ``--feature-range`` before it starts the SuperNode.
"""

from __future__ import annotations

import math

from common.errors import FedtideError

# Every value of the samples fedtide's datasets make lies in [0, 1] (uint8 pixels / 255,
# scikit-learn's digits / 16; rotation, permutation and padding keep it), and so does every
# uint8 pixel of an inbox file once scaled.
DEFAULT_FEATURE_RANGE = (0.0, 1.0)
# Pixels and standardised features stay far below; the bound keeps a mistyped range (1e30)
# from letting absurd values through.
MAX_FEATURE_MAGNITUDE = 1e6


def parse_feature_range(text: str, flag: str = "--feature-range") -> tuple[float, float]:
    """``"LOW,HIGH"`` as two finite floats, LOW < HIGH, each within +-MAX_FEATURE_MAGNITUDE;
    FedtideError naming ``flag`` otherwise."""
    parts = str(text).split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise FedtideError(f"{flag} must be two numbers LOW,HIGH (got {str(text)[:40]!r})") from None
    if not all(math.isfinite(v) and abs(v) <= MAX_FEATURE_MAGNITUDE for v in (low, high)) or not low < high:
        raise FedtideError(
            f"{flag} must be two finite numbers LOW,HIGH with LOW < HIGH, each between "
            f"-{MAX_FEATURE_MAGNITUDE:g} and {MAX_FEATURE_MAGNITUDE:g} (got {str(text)[:40]!r})"
        )
    return low, high
