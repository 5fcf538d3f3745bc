"""A method's loss terms as data, for the batched path (``client.vectorized``).

On the one-client path a method adds its ``penalty`` by computing it on the model. To train
a round's clients in one batched computation, the batched path needs the same terms as
tensors it can stack across clients: a method describes its terms once per round
(``Method.round_terms``) and once per batch (``Method.batch_terms``), and
``client.batched_loss`` computes them for every client at once. Each term says exactly which
``penalty`` (or ``classification_loss``) it stands for; the parity tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pull:
    """sum over parameters of ``coefficient * (theta - anchor) ** 2`` (EWC, SI/MAS, FedProx):
    ``coefficient`` and ``anchor`` by parameter name; a coefficient may be a float."""

    coefficient: dict[str, torch.Tensor | float]
    anchor: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Distill:
    """LwF: ``weight * T^2 * KL(softmax(teacher(x) / T) || softmax(logits / T))``, the mean
    over the batch's samples; ``teacher`` the teacher model's weights by name."""

    teacher: dict[str, torch.Tensor]
    weight: float
    temperature: float


@dataclass(frozen=True)
class MatchLogits:
    """DER: ``weight * mean((logits[rows] - targets) ** 2)`` over the rows and classes;
    ``rows`` index the (extended) batch."""

    rows: torch.Tensor
    targets: torch.Tensor
    weight: float


@dataclass(frozen=True)
class OwnClassesOnly:
    """ER-ACE: in the cross-entropy, the batch's first ``num_new`` (new) samples compete only
    among the classes present in them; the rest use every class."""

    num_new: int


Term = Pull | Distill | MatchLogits | OwnClassesOnly
