"""Fault injection for simulations: chosen clients send faulty or hostile replies.

A robust server must be shown to withstand what it claims to, so the faulty reply is made
by the client and travels through the Message API like any other. ``faulty_client_app``
wraps the ClientApp for the simulation runtimes; a deployed client never runs it, and no
fault setting ever reaches a client over the wire. The attacking clients
are ``FaultSettings.attacker_partitions`` (``--attackers K``: the first K partition ids, or
``--attacker-ids``); everything is seeded by (seed, partition, round). With ``g`` the
global weights the client received and ``w`` what honest training gave:

- ``sign-flip``: ``g - (w - g)``, the update reversed;
- ``scale``: ``g + s * (w - g)``, the update times ``--attack-scale``;
- ``noise``: ``w + N(0, --attack-noise-std^2)`` on every weight;
- ``nan`` / ``inf``: every weight NaN / +Inf;
- ``wrong-shape``: the first array gets one extra row;
- ``lie-num-examples``: claims ``--attack-scale`` times its real number of samples;
- ``label-flip``: trains honestly on poisoned labels, ``y -> classes - 1 - y`` (before
  training, see ``poison_labels``; the others apply after).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import app as plain
from client.rounds import TrainOutcome
from common.config import ClientSettings
from common.datasets import LabelledSplit
from common.scenarios import build_scenario
from common.sections import FaultSettings
from common.seeding import derive_seed

NOISE_STREAM = 0xA77AC  # keeps the attack's noise apart from the training's random stream
BEFORE_TRAINING = ("label-flip",)


class FaultInjection:
    """The ``client.app.Tampering`` of ``--attack``: what the attacking clients change."""

    def __init__(self, faults: FaultSettings) -> None:
        self.faults = faults

    def attacks(self, partition_id: int) -> bool:
        return self.faults.attack != "none" and partition_id in self.faults.attacker_partitions

    def poison(self, settings: ClientSettings, partition_id: int) -> Callable[[LabelledSplit], LabelledSplit] | None:
        """The function that poisons this client's training data, or None for an honest one."""
        if self.faults.attack != "label-flip" or not self.attacks(partition_id):
            return None
        num_classes = build_scenario(settings.data, settings.seed).num_classes
        return lambda data: poison_labels(data, num_classes)

    def reply(self, settings: ClientSettings, partition_id: int, server_round: int,
              received: dict[str, torch.Tensor], outcome: TrainOutcome) -> TrainOutcome:
        """The reply an attacking client sends instead of ``outcome`` (unchanged for an honest
        client or an attack that acts before training). The client's own state is untouched."""
        faults = self.faults
        if not self.attacks(partition_id) or faults.attack in BEFORE_TRAINING:
            return outcome
        weights, metrics = dict(outcome.weights), dict(outcome.metrics)
        kind, scale = faults.attack, faults.attack_scale
        if kind == "lie-num-examples":
            metrics["num-examples"] = max(1, round(int(metrics["num-examples"]) * scale))
        elif kind == "wrong-shape":
            name = next(iter(weights))
            weights[name] = torch.cat([weights[name], weights[name][:1]])
        else:
            seed = derive_seed(settings.seed, partition_id, server_round, NOISE_STREAM)
            generator = torch.Generator().manual_seed(seed)
            weights = {name: _attack(kind, received[name], w, scale, faults.attack_noise_std, generator)
                       for name, w in weights.items()}
        return dataclasses.replace(outcome, weights=weights, metrics=metrics)


def faulty_client_app(faults: FaultSettings) -> ClientApp:
    """fedtide's ClientApp with ``faults`` injected; the plain one when there is no attack."""
    if faults.attack == "none":
        return plain.app
    injection = FaultInjection(faults)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return plain.train_message(msg, context, injection)

    app.evaluate()(plain.evaluate)
    return app


def faulty_train_many(faults: FaultSettings) -> Callable[[list[Message], list[Context]], list[Message] | None]:
    """``client.app.train_many`` with ``faults`` injected."""
    injection = FaultInjection(faults) if faults.attack != "none" else None
    return lambda messages, contexts: plain.train_many(messages, contexts, injection)


def poison_labels(data: LabelledSplit, num_classes: int) -> LabelledSplit:
    return dataclasses.replace(data, y=(num_classes - 1) - data.y)


def _attack(kind: str, g: torch.Tensor, w: torch.Tensor, scale: float, std: float, generator: torch.Generator) -> torch.Tensor:
    if not w.is_floating_point():
        return w
    g = g.to(w.dtype)
    if kind == "sign-flip":
        return g - (w - g)
    if kind == "scale":
        return g + scale * (w - g)
    if kind == "noise":
        return w + std * torch.randn(w.shape, generator=generator, dtype=w.dtype)
    if kind == "nan":
        return torch.full_like(w, float("nan"))
    if kind == "inf":
        return torch.full_like(w, float("inf"))
    raise ValueError(f"unknown attack '{kind}'")
