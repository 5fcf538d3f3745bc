"""Which of the server's models a client trains, when the server keeps several.

With clustered training (``server.clusters``) a training message carries every cluster's
model. The client measures each one's loss on this round's data before training and
trains the best; with the ``oracle`` rule (a simulation reference) it takes its own
concept's. Its reply says which it trained and every model's loss, so that the server can
start a model for a client no model fits and merge models that fit the same clients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from client.rounds import load_global, plan_round
from common.datasets import LabelledSplit
from common.config import CHOICE_KEY, LOSS_KEY, LOSSES_KEY, MAX_CLUSTERS, MAX_LOSS, ClientSettings
from common.devices import resolve_device
from common.errors import FedtideError
from common.evaluation import accuracy
from common.scenarios import build_scenario

CHOICE_RULES = ("loss", "oracle")
MAX_CANDIDATES = MAX_CLUSTERS  # the server keeps at most --max-clusters models


@dataclass(frozen=True)
class Choice:
    """The cluster to train, and every offered model's loss on the round's data (in the
    order of the cluster ids)."""

    cluster: int
    losses: dict[int, float]

    def metrics(self) -> dict[str, int | float | list[float]]:
        return {CHOICE_KEY: self.cluster, LOSS_KEY: self.losses[self.cluster],
                LOSSES_KEY: [self.losses[c] for c in sorted(self.losses)]}


def choose_model(
    config: ClientSettings,
    partition_id: int,
    server_round: int,
    candidates: dict[int, dict[str, torch.Tensor]],
    state: dict[str, torch.Tensor],
    rule: str = "loss",
    device_name: str | None = None,
) -> Choice:
    """The candidate a simulated client trains this round (see the module docstring).
    FedtideError for a rule it does not know, no candidates, or too many."""
    check_choice(rule, candidates)
    scenario = build_scenario(config.data, config.seed)
    plan = plan_round(config, partition_id, server_round, state)
    losses = model_losses(config, scenario.input_shape, scenario.num_classes, candidates, plan.data, device_name)
    if rule == "oracle":
        if plan.task not in losses:
            raise FedtideError(f"the server sent no model for this client's concept {plan.task}")
        return Choice(plan.task, losses)
    return best_choice(losses)


def check_choice(rule: str, candidates: dict[int, dict[str, torch.Tensor]]) -> None:
    if rule not in CHOICE_RULES:
        raise FedtideError(f"the server asks to choose a model by '{str(rule)[:20]}': this client knows "
                           f"{', '.join(CHOICE_RULES)}; run server and clients of the same fedtide version")
    if not 0 < len(candidates) <= MAX_CANDIDATES:
        raise FedtideError(f"the server sent {len(candidates)} models to choose from; at most {MAX_CANDIDATES} are allowed")


def model_losses(config: ClientSettings, input_shape: tuple[int, ...], num_classes: int,
                 candidates: dict[int, dict[str, torch.Tensor]], data: LabelledSplit,
                 device_name: str | None = None) -> dict[int, float]:
    """Each candidate's mean cross-entropy on ``data``, at most ``MAX_LOSS`` (a diverged model's
    NaN or Inf counts as that); FedtideError when a candidate does not fit the model."""
    device = resolve_device(device_name or config.learner.device)
    losses = {}
    for cluster, weights in sorted(candidates.items()):
        model = load_global(config, input_shape, num_classes, weights).to(device)
        loss = accuracy(model, data, device)[1]
        losses[cluster] = min(loss, MAX_LOSS) if math.isfinite(loss) else MAX_LOSS
    return losses


def best_choice(losses: dict[int, float]) -> Choice:
    """The candidate with the lowest loss (the lowest id among equals)."""
    return Choice(min(losses, key=lambda c: (losses[c], c)), losses)
