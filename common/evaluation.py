"""Accuracy of a model on a labelled split; shared by clients and the server."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.datasets import LabelledSplit


@torch.no_grad()
def accuracy(model: nn.Module, data: LabelledSplit, device: torch.device, batch_size: int = 1024) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``data``."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device)
        y = data.y[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    n = max(len(data), 1)
    return correct / n, loss_sum / n
