"""The example's data: scikit-learn's 8x8 digits, split over the nodes, whose classes arrive
two at a time (a new pair every ``ROUNDS_PER_TASK`` rounds): a drifting stream."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

ROUNDS_PER_TASK = 2
TASKS = 5
SETTINGS = {"method": "replay", "memory-size": 100, "local-epochs": 2, "lr": 0.1, "hidden": "64"}


def digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32)[:, None], bunch.target


def node_stream(partition: int, partitions: int, server_round: int) -> tuple[np.ndarray, np.ndarray]:
    """This node's new samples in ``server_round``: its share of the current task's classes."""
    x, y = digits()
    task = min((server_round - 1) // ROUNDS_PER_TASK, TASKS - 1)
    mine = np.flatnonzero((y // 2 == task) & (np.arange(len(y)) % partitions == partition))
    return x[mine], y[mine]
