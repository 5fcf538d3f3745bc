"""The one local training loop every method shares."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from client.methods import Method
from client.plain_sgd import PlainSGD
from common.datasets import LabelledSplit
from common.sections import LearnerSettings


@dataclass(frozen=True)
class TrainStats:
    num_examples: int
    loss: float  # mean training loss (including penalties) over all steps
    prequential_accuracy: float  # accuracy on each new batch before training on it (epoch 1)
    errors: torch.Tensor  # uint8 [num_examples]: 1 where a new sample was mispredicted, stream order
    epochs: int = 1  # passes over the data this round
    # --dp sample: the client's DP-SGD history to keep (client state), its epsilon so far, and
    # whether it stopped training because another round would pass --target-epsilon
    privacy_state: dict[str, torch.Tensor] = field(default_factory=dict)
    epsilon: float | None = None
    budget_spent: bool = False


@dataclass(frozen=True)
class LocalTraining:
    """What one stretch of local training runs with: the rate this round's optimizer uses
    (scheduled, perhaps boosted), the epochs, the batch size and the optimizer."""

    lr: float
    epochs: int
    batch_size: int
    optimizer: str = "sgd"

    @classmethod
    def of(cls, learner: LearnerSettings, lr: float | None = None, epochs: int | None = None) -> "LocalTraining":
        return cls(learner.lr if lr is None else lr, learner.local_epochs if epochs is None else epochs,
                   learner.batch_size, learner.optimizer)


def make_optimizer(training: LocalTraining, model: nn.Module) -> PlainSGD | torch.optim.Optimizer:
    """SGD is fedtide's own ``PlainSGD`` (the same numbers as ``torch.optim.SGD``, without
    importing torch's compiler stack into every edge round); Adam is torch's."""
    params = [p for p in model.parameters() if p.requires_grad]
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.lr)
    return PlainSGD(params, lr=training.lr)


def batch_loss(methods: list[Method], model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor,
               num_new: int) -> torch.Tensor:
    """The loss of an (extended) batch whose first ``num_new`` samples are new: a method's
    classification loss or the plain cross-entropy, plus every method's penalty."""
    loss = next((l for m in methods if (l := m.classification_loss(logits, yb, num_new)) is not None), None)
    if loss is None:
        loss = F.cross_entropy(logits, yb)
    for method in methods:
        extra = method.penalty(model, xb, logits)
        if extra is not None:
            loss = loss + extra
    return loss


def train_local(
    model: nn.Module,
    data: LabelledSplit,
    methods: list[Method],
    training: LocalTraining,
    generator: torch.Generator,
    device: torch.device,
    observe: bool = True,
    continuing: bool = False,
) -> TrainStats:
    """Train ``model`` in place for ``training.epochs`` epochs over ``data``.

    In the first epoch every sample is predicted before it is trained on (prequential
    accuracy); with ``observe`` it is also shown once to each method's ``observe`` (the
    caller passes False when these samples were already observed in an earlier round).
    ``continuing``: more epochs of a round already trained, so the methods keep what
    ``start_round`` gave them (FedProx's anchor stays the global model, not this one).
    """
    model.train()
    optimizer = make_optimizer(training, model)
    x_all, y_all = data.x.to(device), data.y.to(device)
    if not continuing:
        for method in methods:
            method.start_round(model)
    steps, loss_sum = 0, 0.0
    errors: list[torch.Tensor] = []
    for epoch in range(training.epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        for start in range(0, len(data), training.batch_size):
            idx = order[start : start + training.batch_size]
            x, y = x_all[idx], y_all[idx]
            xb, yb = x, y
            for method in methods:
                xb, yb = method.extend_batch(xb, yb)
            logits = model(xb)
            loss = batch_loss(methods, model, xb, yb, logits, len(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for method in methods:
                method.after_step(model)
            steps += 1
            loss_sum += float(loss.detach())
            if epoch == 0:
                # the new samples come first in the batch; their logits predate this step
                errors.append((logits[: len(y)].argmax(dim=1) != y).to(torch.uint8).cpu())
                if observe:
                    for method in methods:
                        method.observe(x, y)
    error_bits = torch.cat(errors) if errors else torch.zeros(0, dtype=torch.uint8)
    return TrainStats(
        num_examples=len(data),
        loss=loss_sum / max(steps, 1),
        prequential_accuracy=1.0 - float(error_bits.float().mean()) if len(error_bits) else 0.0,
        errors=error_bits,
        epochs=training.epochs,
    )
