"""Continual-learning metrics on the accuracy matrix.

``R[i][j]`` is the accuracy (a fraction in [0, 1]) on task j's test set after training
through task i; ``baseline[j]`` is the accuracy of the untrained model on task j.
Definitions follow Lopez-Paz & Ranzato, "Gradient Episodic Memory" (NeurIPS 2017), and
forgetting follows Chaudhry et al. (2018): best earlier accuracy minus final accuracy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]


def _square(R: Matrix) -> np.ndarray:
    m = np.asarray(R, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {m.shape}")
    return m


def average_accuracy(R: Matrix) -> float:
    """ACC = mean over tasks j of R[T-1][j]."""
    m = _square(R)
    return float(m[-1].mean())


def backward_transfer(R: Matrix) -> float:
    """BWT = mean over j < T-1 of R[T-1][j] - R[j][j]; negative means forgetting. 0 if T == 1."""
    m = _square(R)
    t = m.shape[0]
    if t == 1:
        return 0.0
    return float(np.mean([m[-1, j] - m[j, j] for j in range(t - 1)]))


def forward_transfer(R: Matrix, baseline: Sequence[float]) -> float:
    """FWT = mean over j >= 1 of R[j-1][j] - baseline[j]. 0 if T == 1."""
    m = _square(R)
    t = m.shape[0]
    if len(baseline) != t:
        raise ValueError(f"baseline has {len(baseline)} entries for {t} tasks")
    if t == 1:
        return 0.0
    return float(np.mean([m[j - 1, j] - baseline[j] for j in range(1, t)]))


def forgetting_per_task(R: Matrix) -> list[float]:
    """For each task j < T-1: max over l in [j, T-2] of R[l][j], minus R[T-1][j]."""
    m = _square(R)
    t = m.shape[0]
    return [float(m[j : t - 1, j].max() - m[-1, j]) for j in range(t - 1)]


def average_forgetting(R: Matrix) -> float:
    per_task = forgetting_per_task(R)
    return float(np.mean(per_task)) if per_task else 0.0


def summarize(R: Matrix, baseline: Sequence[float]) -> dict[str, float | list[float]]:
    """All metrics of one finished run, as fractions."""
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, baseline),
        "forgetting": average_forgetting(R),
        "forgetting_per_task": forgetting_per_task(R),
    }
