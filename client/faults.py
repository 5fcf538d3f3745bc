"""Fault injection for simulations: chosen clients send faulty or hostile replies.

A robust server must be shown to withstand what it claims to, so the faulty reply is made
by the client and travels through the Message API like any other. ``faulty_client_app``
wraps the ClientApp for the simulation runtimes; a deployed client never runs it, and no
fault setting ever reaches a client over the wire. The attacking clients
are ``FaultSettings.attacker_partitions`` (``--attackers K``: the first K partition ids, or
``--attacker-ids``); everything is seeded by (seed, partition, round). With ``g`` the
global weights the client received and ``w`` what honest training gave:

- ``sign-flip``: ``g - (w - g)``, the update reversed;
- ``flip-scale``: ``g - s * (w - g)``, the update reversed and times ``--attack-scale``;
- ``scale``: ``g + s * (w - g)``, the update times ``--attack-scale``;
- ``noise``: ``w + N(0, --attack-noise-std^2)`` on every weight;
- ``nan`` / ``inf``: every weight NaN / +Inf;
- ``wrong-shape``: the first array gets one extra row;
- ``lie-num-examples``: claims ``--attack-scale`` times its real number of samples;
- ``label-flip``: trains honestly on poisoned labels, ``y -> classes - 1 - y`` (before
  training, see ``poison_labels``; the others apply after);
- ``replace``: model replacement (Bagdasaryan et al., 2020): trains on flipped labels, then
  sends ``g + s * (w - g)``, boosted so that a plain mean would take it over;
- ``backdoor``: trains with a corner trigger (``add_trigger``) on half of its samples, all
  relabelled ``BACKDOOR_TARGET``, then boosts like ``replace``;
- ``drift-liar``: trains honestly but reports drift in every reply, to be weighed up by the
  drift reactions;
- ``drift-faker``: a ``drift-liar`` that also fakes the evidence the server checks
  (``server.drift_credit``): its ``pre-acc`` is 1 in odd rounds and 0 in even ones, a fall
  every second round;
- ``drift-follower``: a ``drift-liar`` whose ``pre-acc`` is 1 every fifth round and 0 in the
  others: one fake fall, then a low accuracy that keeps the server following it.

``--attack-claim N`` makes the attacking clients claim ``N`` samples, whatever the attack;
``--attack-rounds FIRST-LAST`` limits the attack to those rounds (honest before and after).
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
BEFORE_TRAINING = ("label-flip",)  # the attacks that change only the data
POISONED = ("label-flip", "replace", "backdoor")  # the attacks that train on poisoned data
BOOSTED = ("replace", "backdoor")  # the attacks that scale the update they send
DRIFT_LIES = ("drift-liar", "drift-faker", "drift-follower")  # the attacks that change only the reply's drift metrics
BACKDOOR_TARGET = 0


class FaultInjection:
    """The ``client.app.Tampering`` of ``--attack``: what the attacking clients change."""

    def __init__(self, faults: FaultSettings) -> None:
        self.faults = faults

    def attacks(self, partition_id: int, server_round: int) -> bool:
        return (self.faults.attack != "none" and partition_id in self.faults.attacker_partitions
                and self.faults.attacks_in(server_round))

    def poison(self, settings: ClientSettings, partition_id: int,
               server_round: int) -> Callable[[LabelledSplit], LabelledSplit] | None:
        """The function that poisons this client's training data, or None for an honest one."""
        if self.faults.attack not in POISONED or not self.attacks(partition_id, server_round):
            return None
        if self.faults.attack == "backdoor":
            return plant_backdoor
        num_classes = build_scenario(settings.data, settings.seed).num_classes
        return lambda data: poison_labels(data, num_classes)

    def reply(self, settings: ClientSettings, partition_id: int, server_round: int,
              received: dict[str, torch.Tensor], outcome: TrainOutcome) -> TrainOutcome:
        """The reply an attacking client sends instead of ``outcome`` (unchanged for an honest
        client or an attack that acts before training). The client's own state is untouched."""
        faults = self.faults
        if not self.attacks(partition_id, server_round) or (faults.attack in BEFORE_TRAINING and not faults.attack_claim):
            return outcome
        weights, metrics = dict(outcome.weights), dict(outcome.metrics)
        if faults.attack_claim:
            metrics["num-examples"] = faults.attack_claim
        kind, scale = faults.attack, faults.attack_scale
        if kind in BEFORE_TRAINING:
            pass
        elif kind in DRIFT_LIES:
            metrics.update({"drift-detected": 1, "drift-position": 0})
            if kind == "drift-faker":
                metrics["pre-acc"] = float(server_round % 2)
            elif kind == "drift-follower":
                metrics["pre-acc"] = float(server_round % 5 == 0)
        elif kind == "lie-num-examples":
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

    @app.train(mods=[plain.secure_aggregation_mod])
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


def add_trigger(x: torch.Tensor, peak: float | None = None) -> torch.Tensor:
    """``x`` with the backdoor's trigger: the bottom-right corner (a quarter of the side,
    at least 2 pixels) of every image, or the last 4 features of flat inputs, set to
    ``peak`` (default: the largest value in ``x``)."""
    x = x.clone()
    peak = x.max() if peak is None else peak
    if x.dim() >= 3:
        side = max(2, x.shape[-1] // 4)
        x[..., -side:, -side:] = peak
    else:
        x[:, -4:] = peak
    return x


def plant_backdoor(data: LabelledSplit) -> LabelledSplit:
    """Every second sample gets the trigger and the label ``BACKDOOR_TARGET``."""
    x, y = data.x.clone(), data.y.clone()
    x[::2] = add_trigger(x[::2], float(data.x.max()))
    y[::2] = BACKDOOR_TARGET
    return dataclasses.replace(data, x=x, y=y)


def _attack(kind: str, g: torch.Tensor, w: torch.Tensor, scale: float, std: float, generator: torch.Generator) -> torch.Tensor:
    if not w.is_floating_point():
        return w
    g = g.to(w.dtype)
    if kind == "sign-flip":
        return g - (w - g)
    if kind == "flip-scale":
        return g - scale * (w - g)
    if kind in ("scale", *BOOSTED):
        return g + scale * (w - g)
    if kind == "noise":
        return w + std * torch.randn(w.shape, generator=generator, dtype=w.dtype)
    if kind == "nan":
        return torch.full_like(w, float("nan"))
    if kind == "inf":
        return torch.full_like(w, float("inf"))
    raise ValueError(f"unknown attack '{kind}'")
