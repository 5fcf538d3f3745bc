"""Continual-learning methods as small hooks on one training loop (see ``base``), one module
each; ``build_methods`` makes a round's methods from the run's method options."""

from __future__ import annotations

from typing import Any

from client.methods.base import Method
from client.methods.der import DarkReplay
from client.methods.ewc import EWC, diagonal_fisher
from client.methods.lwf import LwF
from client.methods.prox import Proximal
from client.methods.replay import Replay
from common.method_registry import active_methods

__all__ = ["DarkReplay", "EWC", "LwF", "Method", "Proximal", "Replay", "build_methods", "diagonal_fisher"]


def build_methods(parts: tuple[str, ...], options: dict[str, Any], seed: int, lr: float) -> list[Method]:
    """The hooks of the methods a run uses, in the registry's fixed order (replay or der, ewc,
    lwf, then prox, then any added method). ``lr``: the rate this round's optimizer runs at."""
    return [cls.from_options(options, seed, lr) for cls in active_methods(parts, options)]
