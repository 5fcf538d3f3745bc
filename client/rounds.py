"""What one client does in one round, on plain objects (no Flower types).

The client's long-lived state (replay memory, EWC Fisher and anchor, LwF teacher, the
task it last trained on) comes in and goes out as one flat dict of tensors, so a runtime
may keep it in memory or on disk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from client.drift import DriftMonitor
from client.drift_signals import RoundEvidence, gather_evidence, round_drift
from client.learner import LocalTraining, TrainStats, train_local
from client.lr_schedule import PLATEAU_KEY, round_lr, update_plateau
from common.evaluation import accuracy
from client.methods import Method, build_methods
from common.config import DP_SPENT_KEY, SAMPLE_EPSILON_KEY, ClientSettings
from common.datasets import LabelledSplit
from common.devices import resolve_device
from common.errors import FedtideError
from common.models import build_model
from common.scenarios import build_scenario
from common.sections import ROUND_DETECTORS, DriftSettings
from common.seeding import derive_seed
from common.weights import freeze

LAST_TASK_KEY = "meta.last-task"
BOOST_KEY = "meta.lr-boost-next"  # 1 when this client detected drift in its last round
DRIFT_PREFIX = "drift."


@dataclass
class TrainOutcome:
    weights: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    state: dict[str, torch.Tensor]


def _load_global(config: ClientSettings, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    scenario = build_scenario(config.data, config.seed)
    return load_global(config, scenario.input_shape, scenario.num_classes, weights)


def load_global(
    config: ClientSettings, input_shape: tuple[int, ...], num_classes: int, weights: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """The settings' model with the server's ``weights``; FedtideError when they do not fit."""
    model = build_model(config.network.model, input_shape, num_classes, config.network.hidden_widths, config.seed)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise FedtideError(
            f"the server's model does not fit this client's model ({config.network.model}, hidden "
            f"{config.network.hidden}): {str(err).splitlines()[0]}; run server and clients with the same settings"
        ) from None
    return model


@dataclass
class RoundPlan:
    """What a client will do this round, decided before any training."""

    task: int
    task_changed: bool
    lr: float
    data: LabelledSplit
    generator: torch.Generator


def drifted_last_round(state: dict[str, torch.Tensor]) -> bool:
    return BOOST_KEY in state and int(state[BOOST_KEY]) == 1


def plan_lr(config: ClientSettings, rounds_into_task: int, state: dict[str, torch.Tensor], task_changed: bool) -> float:
    """This round's learning rate: the schedule's, boosted in the round after a detected drift."""
    lr = round_lr(config.learner.lr, config.learner.lr_schedule, rounds_into_task, config.data.rounds_per_task, state, task_changed)
    return lr * config.drift.react_lr_boost if drifted_last_round(state) else lr


def restore_methods(methods: list[Method], state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give each method its part of the client state (keys ``<method name>.``)."""
    for method in methods:
        prefix = f"{method.name}."
        saved = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if saved:
            method.load_state(saved, device)


def methods_state(methods: list[Method]) -> dict[str, torch.Tensor]:
    """The methods' state as CPU tensors under ``<method name>.`` keys, the inverse of ``restore_methods``."""
    return {f"{m.name}.{k}": v.detach().cpu() for m in methods for k, v in m.state().items()}


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def plan_round(config: ClientSettings, partition_id: int, server_round: int, state: dict[str, torch.Tensor]) -> RoundPlan:
    scenario = build_scenario(config.data, config.seed)
    task = scenario.task_of(partition_id, server_round)
    last_task = int(state[LAST_TASK_KEY]) if LAST_TASK_KEY in state else -1
    task_changed = last_task != task
    rounds_into_task = scenario.schedule.rounds_into_task(partition_id, server_round)
    return RoundPlan(
        task=task,
        task_changed=task_changed,
        lr=plan_lr(config, rounds_into_task, state, task_changed),
        data=scenario.train_data(partition_id, task),
        generator=torch.Generator().manual_seed(derive_seed(config.seed, partition_id, server_round)),
    )


def train_round(
    config: ClientSettings,
    partition_id: int,
    server_round: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    device_name: str | None = None,
    poison: Callable[[LabelledSplit], LabelledSplit] | None = None,
) -> TrainOutcome:
    """Train the received global weights on this client's data for its current task
    (first passed through ``poison``, when a simulated attacker poisons its data)."""
    scenario = build_scenario(config.data, config.seed)
    device = resolve_device(device_name or config.learner.device)
    plan = plan_round(config, partition_id, server_round, state)
    if poison is not None:
        plan = dataclasses.replace(plan, data=poison(plan.data))
    model = _load_global(config, weights).to(device)
    freeze(model, config.network.frozen_prefixes)
    methods = round_methods(config, scenario, partition_id, plan, state, model, device)
    # a client's data for a task is fixed, so memories are offered each sample once:
    # in the first round the client trains on that task
    stats, drift = train_and_react(model, plan, methods, config, state, device, observe=plan.task_changed)
    return finish_round(config, plan, stats, state, model_weights(model), methods_state(methods), drift)


def round_methods(config: ClientSettings, scenario, partition_id: int, plan: RoundPlan, state: dict[str, torch.Tensor],
                  model: torch.nn.Module, device: torch.device) -> list[Method]:
    """The client's methods for this round, restored from ``state``; at a new task, told the
    task ended (``start_task`` with the received ``model``)."""
    methods = build_methods(config.methods.parts, config.methods.options, derive_seed(config.seed, partition_id), plan.lr)
    restore_methods(methods, state, device)
    last_task = int(state[LAST_TASK_KEY]) if LAST_TASK_KEY in state else -1
    if 0 <= last_task != plan.task:
        previous = scenario.train_data(partition_id, last_task)
        for method in methods:
            method.start_task(model, previous)
    return methods


@dataclass
class DriftCheck:
    """Where in this round's stream the client's detector saw the error rate rise, the
    detector's state after the round (``DRIFT_PREFIX`` keys), and the received model's
    evidence on the round's new data (None when no detector runs or nothing new came)."""

    positions: list[int]
    state: dict[str, torch.Tensor]
    evidence: RoundEvidence | None = None
    recovering: bool = False  # a round after a detection, the model still well below its level before


def check_drift(
    drift: DriftSettings, state: dict[str, torch.Tensor], errors: torch.Tensor, evidence: RoundEvidence | None = None
) -> DriftCheck:
    """Feed this round's prequential errors (a River detector) or its evidence (a round-level
    test) to the detector restored from ``state``."""
    if drift.drift_detector == "none":
        return DriftCheck([], {})
    saved = {k[len(DRIFT_PREFIX):]: v for k, v in state.items() if k.startswith(DRIFT_PREFIX)}
    if drift.drift_detector in ROUND_DETECTORS:
        if evidence is None:  # nothing new: the comparison waits for the next new data
            return DriftCheck([], {DRIFT_PREFIX + k: v for k, v in saved.items()})
        before = RoundEvidence.from_state(saved, evidence.input_mean.numel())
        found = round_drift(drift.drift_detector, before, evidence, drift.drift_margin)
        kept = {DRIFT_PREFIX + k: v for k, v in evidence.as_state().items()}
        follow = _follow(drift, saved.get(FOLLOW_KEY), before if found else None, evidence)
        if follow is not None:
            kept[DRIFT_PREFIX + FOLLOW_KEY] = follow
        recovering = not found and follow is not None
        return DriftCheck([0] if found else [], kept, evidence, recovering)
    monitor = DriftMonitor(drift.drift_detector, drift.drift_delta)
    if "errors" in saved:
        monitor.load_state(saved)
    positions = monitor.update(errors)
    return DriftCheck(positions, {DRIFT_PREFIX + k: v for k, v in monitor.state().items()}, evidence)


FOLLOW_KEY = "follow"  # [accuracy before the detected fall, rounds the reaction may still follow it]


def _follow(drift: DriftSettings, saved: torch.Tensor | None, fell_from: RoundEvidence | None,
            now: RoundEvidence) -> torch.Tensor | None:
    """The follow state after this round: a detection starts it at the accuracy before the
    fall; a later round keeps it (one round less) while accuracy is still more than the
    margin below that level. None when no reaction follows."""
    if drift.drift_follow_rounds == 0:
        return None
    if fell_from is not None:
        return torch.tensor([fell_from.accuracy, drift.drift_follow_rounds], dtype=torch.float64)
    if saved is None or saved.shape != (2,) or not torch.isfinite(saved).all():
        return None
    level, left = float(saved[0]), min(int(saved[1]), drift.drift_follow_rounds)
    if left <= 0 or now.accuracy >= level - drift.drift_margin:
        return None
    return torch.tensor([level, left - 1], dtype=torch.float64)


def train_and_react(
    model: torch.nn.Module,
    plan: RoundPlan,
    methods: list[Method],
    config: ClientSettings,
    state: dict[str, torch.Tensor],
    device: torch.device,
    observe: bool,
    stream: bool = True,
) -> tuple[TrainStats, DriftCheck]:
    """Train for the round's epochs and check the stream for drift. With
    ``react_extra_epochs``, a client that found drift (or, with a round-level detector, is
    still recovering from it: ``drift_follow_rounds``) trains that many more epochs on the
    same data before it replies, so that its reply in this very round already carries
    more of the new concept (a reaction in the next round comes a round late). The extra
    epochs start a fresh optimizer (Adam's moments too).
    ``stream`` is False when the data is not the stream (an edge client retraining on its
    memory): then neither its errors nor its evidence may move the detector."""
    evidence = gather_evidence(model, plan.data, device) if stream and config.drift.drift_detector != "none" else None
    early = start_stream(model, plan, methods, config, state, evidence, stream)
    stats = train_stretch(model, plan, methods, config, state, device, observe, memories=stream)
    if not stream:
        stats = dataclasses.replace(stats, errors=torch.zeros(0, dtype=torch.uint8))
    drift = early if early is not None else check_drift(config.drift, state, stats.errors, evidence)
    if (drift.positions or drift.recovering) and config.drift.react_extra_epochs > 0:
        extra = train_stretch(model, plan, methods, config, {**state, **stats.privacy_state}, device, observe=False,
                              epochs=config.drift.react_extra_epochs, continuing=True, memories=stream)
        # the loss stays the round's own epochs' (a plateau schedule compares it round to round)
        stats = dataclasses.replace(stats, epochs=stats.epochs + extra.epochs, privacy_state=extra.privacy_state,
                                    epsilon=extra.epsilon if extra.epsilon is not None else stats.epsilon)
    return stats, drift


def start_stream(model: torch.nn.Module, plan: RoundPlan, methods: list[Method], config: ClientSettings,
                 state: dict[str, torch.Tensor], evidence: RoundEvidence | None, stream: bool = True) -> DriftCheck | None:
    """Before training: a round-level detector's verdict on ``evidence`` (None for a River
    detector, whose verdict comes after training), and the methods shown the round's new data
    (``start_data``) with whether it drifted."""
    # a round-level test reads only the evidence: its verdict is known before training, so the
    # methods see a drift at the very samples it is at; a River detector's comes after, a round late
    early = check_drift(config.drift, state, torch.zeros(0, dtype=torch.uint8), evidence) \
        if config.drift.drift_detector in ROUND_DETECTORS else None
    if stream:
        drifted = bool(early.positions) if early is not None else drifted_last_round(state)
        for method in methods:
            method.start_data(model, plan.data, drifted)
    return early


def train_stretch(model: torch.nn.Module, plan: RoundPlan, methods: list[Method], config: ClientSettings,
                  state: dict[str, torch.Tensor], device: torch.device, observe: bool, epochs: int | None = None,
                  continuing: bool = False, memories: bool = True) -> TrainStats:
    """One stretch of local training: the shared loop, or DP-SGD with ``--dp sample`` (its
    budget read from ``state`` and returned in the stats; ``memories`` False when the data
    is the memory itself, so that no sample is drawn twice in a step)."""
    training = LocalTraining.of(config.learner, lr=plan.lr, epochs=epochs)
    if config.privacy.dp != "sample":
        return train_local(model, plan.data, methods, training, plan.generator, device, observe=observe,
                           continuing=continuing)
    from client.dp_sgd import train_private

    return train_private(model, plan.data, methods, training, config.privacy, state, plan.generator, device,
                         observe=observe, continuing=continuing, memories=memories)


def finish_round(
    config: ClientSettings,
    plan: RoundPlan,
    stats: TrainStats,
    state: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    method_state: dict[str, torch.Tensor],
    drift: DriftCheck,
) -> TrainOutcome:
    """The next state and the reply's metrics, after training and the drift check."""
    new_state: dict[str, torch.Tensor] = {LAST_TASK_KEY: torch.tensor(plan.task), **method_state, **drift.state}
    if config.learner.lr_schedule == "plateau":
        new_state[PLATEAU_KEY] = update_plateau(state, stats.loss, plan.task_changed)
    drift_at = drift.positions
    new_state[BOOST_KEY] = torch.tensor(int(bool(drift_at)))
    new_state.update(stats.privacy_state)  # --dp sample: the device's budget, never reset
    return TrainOutcome(
        weights=weights,
        metrics={
            "num-examples": stats.num_examples,
            "train-loss": stats.loss,
            "prequential-acc": stats.prequential_accuracy,
            "task-id": plan.task,
            "lr": plan.lr,
            "local-epochs": stats.epochs,
            "drift-detected": int(bool(drift_at)),
            "drift-position": drift_at[0] if drift_at else -1,
            **({"pre-acc": drift.evidence.accuracy} if drift.evidence is not None else {}),
            **({SAMPLE_EPSILON_KEY: stats.epsilon} if stats.epsilon is not None else {}),
            **({DP_SPENT_KEY: 1} if stats.budget_spent else {}),
        },
        state=new_state,
    )


def evaluate_round(
    config: ClientSettings,
    partition_id: int,
    server_round: int,
    weights: dict[str, torch.Tensor],
    device_name: str | None = None,
) -> dict[str, float | int]:
    """Accuracy of the received weights on the test sets of every task seen so far."""
    scenario = build_scenario(config.data, config.seed)
    device = resolve_device(device_name or config.learner.device)
    model = _load_global(config, weights).to(device)
    task = scenario.task_of(partition_id, server_round)
    total, correct, loss_sum = 0, 0.0, 0.0
    for seen in range(task + 1):
        data = scenario.test_data(seen)
        acc, loss = accuracy(model, data, device)
        total += len(data)
        correct += acc * len(data)
        loss_sum += loss * len(data)
    return {"num-examples": total, "eval-acc": correct / total, "eval-loss": loss_sum / total, "task-id": task}
