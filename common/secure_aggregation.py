"""What a secure round's client and server agree on (``client.secure_aggregation``,
``server.secure_round``): Flower's SecAgg+ record names, and which arrays the round sums."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

SECURE_CONFIGS = "secaggplus_configs"  # Flower's SecAgg+ record in every protocol message
SECURE_STATE = "secaggplus_state"  # where Flower's secaggplus_mod keeps a node's keys in context.state


def float_names(arrays: Mapping[str, Any]) -> list[str]:
    """The arrays a secure round sums, in the order the server sent them: the floating ones
    (a counter such as BatchNorm's ``num_batches_tracked`` keeps the server's value)."""
    return [name for name, array in arrays.items() if np.issubdtype(as_numpy(array).dtype, np.floating)]


def as_numpy(array: Any) -> np.ndarray:
    """A torch tensor, a Flower ``Array`` or a numpy array, as numpy."""
    if hasattr(array, "detach"):
        return array.detach().cpu().numpy()
    if hasattr(array, "numpy") and not isinstance(array, np.ndarray):
        return array.numpy()
    return np.asarray(array)
