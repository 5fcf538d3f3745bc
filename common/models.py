"""Models by name: an MLP with configurable widths and a small CNN."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then Linear-ReLU blocks of the given widths, then a linear classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = int(torch.tensor(input_shape).prod())
        for width in widths:
            layers += [nn.Linear(width_in, width), nn.ReLU()]
            width_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (32, 64 channels) with pooling, one hidden layer, a classifier.

    Works for any input of at least 8x8 pixels; the widths' first entry sizes the hidden layer.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), widths[0]), nn.ReLU(),
        )
        self.head = nn.Linear(widths[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": SmallCNN}


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...], seed: int
) -> nn.Module:
    """A freshly initialised model; the same seed gives the same weights everywhere."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return MODEL_REGISTRY[name](input_shape, num_classes, widths)
    finally:
        torch.random.set_rng_state(generator_state)
