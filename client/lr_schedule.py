"""A client's learning rate for one round: constant, a cosine cycle that restarts at each
task switch, or halved whenever the training loss stopped improving (reset at a switch)."""

from __future__ import annotations

import math

import torch

PLATEAU_KEY = "schedule.plateau"  # [best loss, rounds without improvement, current factor]
MIN_FACTOR = 0.1
PATIENCE = 2


def round_lr(
    base_lr: float, schedule: str, rounds_into_task: int, rounds_per_task: int, state: dict[str, torch.Tensor], task_changed: bool
) -> float:
    if schedule == "restart":
        progress = min(rounds_into_task, rounds_per_task - 1) / max(rounds_per_task - 1, 1)
        return base_lr * (MIN_FACTOR + (1 - MIN_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress)))
    if schedule == "plateau":
        if task_changed or PLATEAU_KEY not in state:
            return base_lr
        return base_lr * float(state[PLATEAU_KEY][2])
    return base_lr


def update_plateau(state: dict[str, torch.Tensor], loss: float, task_changed: bool) -> torch.Tensor:
    """Remember the best loss of this task; halve the factor after PATIENCE rounds without progress."""
    if task_changed or PLATEAU_KEY not in state:
        return torch.tensor([loss, 0.0, 1.0], dtype=torch.float64)
    best, stale, factor = (float(v) for v in state[PLATEAU_KEY])
    if loss < best * 0.999:
        return torch.tensor([loss, 0.0, factor], dtype=torch.float64)
    stale += 1
    if stale >= PATIENCE:
        return torch.tensor([best, 0.0, max(factor * 0.5, MIN_FACTOR)], dtype=torch.float64)
    return torch.tensor([best, stale, factor], dtype=torch.float64)
