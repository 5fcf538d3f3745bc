"""The hook protocol every continual-learning method follows, and how a run builds its methods.

A method may
- ``start_task``: consolidate when the client moves to a new task (EWC computes the
  Fisher of the old task, LwF freezes the old model as teacher);
- ``start_round``: see the global model the server just sent (FedProx keeps it);
- ``start_data``: see the round's new samples before training on them, and whether the
  client's drift detector found a drift there (replay filled at a boundary moves the finished
  task's samples into its memory; SI and MAS consolidate; MAS measures);
- ``extend_batch``: add samples to a batch (replay mixes in memories);
- ``penalty``: add a term to the loss (EWC, SI, MAS, LwF, FedProx);
- ``after_step``: see each optimizer step (SI's path integral);
- ``observe``: see each new sample once, after it was trained on (replay stores it).
A method that can be ``vectorized`` also states its loss terms as data
(``round_terms``, ``batch_terms``; ``client.methods.terms``), so that a round's clients can
train in one batched computation (``client.vectorized``).
Methods compose: ``replay+ewc`` with ``--prox-mu 0.01`` runs all three hooks on one loop.
Each method's state is a flat dict of tensors, so it can live in memory or on disk.

A method class also declares itself (``common.method_registry``): its ``name``, its
``settings``, whether it ``keeps_memory``, whether a round using it can be ``vectorized``,
what it ``excludes``; ``from_options`` builds it from the run's method options.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from client.methods.terms import Term
from common.datasets import LabelledSplit
from common.settings import Setting


class Method:
    name: ClassVar[str] = "method"
    order: ClassVar[int] = 100  # hooks run in this order among a run's methods (built-ins: 10-50)
    settings: ClassVar[tuple[Setting, ...]] = ()
    keeps_memory: ClassVar[bool] = False  # holds samples (a replay memory) in its state
    vectorized: ClassVar[bool] = False  # a round of clients can share one batched computation (its terms: round_terms, batch_terms)
    selectable: ClassVar[bool] = True  # named in --method (False: its settings turn it on)
    excludes: ClassVar[tuple[str, ...]] = ()  # methods it cannot be combined with

    @classmethod
    def active(cls, parts: tuple[str, ...], options: dict[str, Any]) -> bool:
        """Whether a run with these ``--method`` parts and method options uses it."""
        return cls.name in parts

    @classmethod
    def check(cls, parts: tuple[str, ...], options: dict[str, Any], context: dict[str, Any]) -> None:
        """Cross-setting rules, at the boundary (``context``: the run's other settings, by field
        name); raise FedtideError with what to change."""

    @classmethod
    def exclusion_reason(cls, other: str) -> str:
        return f"{cls.name} cannot be combined with {other}"

    @classmethod
    def from_options(cls, options: dict[str, Any], seed: int, lr: float) -> "Method":
        """The method for one client's round: ``options`` by flag name, ``seed`` the client's,
        ``lr`` the learning rate its optimizer runs at this round."""
        return cls()

    def start_task(self, model: nn.Module, previous: LabelledSplit | None) -> None:
        pass

    def start_round(self, model: nn.Module) -> None:
        pass

    def start_data(self, model: nn.Module, data: LabelledSplit, drifted: bool) -> None:
        """Before training on a round's new samples ``data``, with the received model;
        ``drifted``: the client's detector found a drift at them."""

    def extend_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def penalty(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def round_terms(self) -> list[Term]:
        """This round's ``penalty`` as terms that stay fixed for the round (after ``start_round``);
        only a ``vectorized`` method is asked."""
        return []

    def batch_terms(self, batch_size: int, num_new: int) -> list[Term]:
        """The terms of the batch just extended (``extend_batch``: ``batch_size`` samples, the
        first ``num_new`` new) that ``round_terms`` cannot state: ``classification_loss``'s and
        any ``penalty`` that depends on the batch; only a ``vectorized`` method is asked."""
        return []

    def after_step(self, model: nn.Module) -> None:
        """After each optimizer step (gradients still on the parameters); SI integrates here."""

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        pass

    def classification_loss(self, logits: torch.Tensor, y: torch.Tensor, num_new: int) -> torch.Tensor | None:
        """Replace the plain cross-entropy on the (extended) batch; None keeps it."""
        return None

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore from ``state()``'s output (CPU tensors); move what training needs to ``device``."""


def saved_int(state: dict[str, torch.Tensor], key: str, default: int, low: int, high: int) -> int:
    """A whole number a method saved in its state, within [low, high]; ``default`` when the
    state lacks it or holds something else there (a file of other settings, or tampered)."""
    value = state.get(key)
    if value is None or value.numel() != 1 or value.is_floating_point() or value.is_complex():
        return default
    return max(low, min(int(value), high))
