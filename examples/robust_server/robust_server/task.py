"""The example's model and data: logistic regression on scikit-learn's 8x8 digits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    return torch.tensor(bunch.data / 16.0, dtype=torch.float32), torch.tensor(bunch.target)


def model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 10)


def accuracy(weights: dict[str, torch.Tensor]) -> float:
    net = model()
    net.load_state_dict(weights)
    x, y = digits()
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def share(partition: int, partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits()
    mine = np.arange(len(y)) % partitions == partition
    return x[mine], y[mine]
