"""Sample-level differential privacy on the device (``--dp sample``): DP-SGD with Opacus, and
the budget each client keeps on its own disk.

Each step draws its batch by Poisson sampling: every new sample of the round joins with
probability q = batch / new samples, and, with replay or der, every memory with probability
q_mem = replay-ratio * batch / memories (never twice in one batch). Opacus computes each
sample's gradient (``GradSampleModule``), clips it to L2 norm ``--dp-clip`` and adds Gaussian
noise of standard deviation ``--dp-noise * --dp-clip`` to the sum (``DPOptimizer``); the sum is
divided by the expected batch size.

**How memories are accounted.** A sample is in the new data in the round it arrives and, once
the client observes it (after that round's training, never during it), may sit in the memory
for the rest of the run. One step is a subsampled Gaussian mechanism at rate max(q, q_mem) for
whichever sample is worst placed; the client composes every step of every round it trains
(Opacus's RDP accountant), so a memory replayed in a hundred rounds pays in all of them. The
epsilon a client reports bounds every sample it ever held, memories included. Each arriving
sample is taken as a record of its own: a person behind many samples needs user-level
accounting, which this is not.

Outside the guarantee: what a client reports beside its weights (prequential accuracy, drift
flags, losses, counts), its drift detector's evidence, and the logits der stores (used only in
their own sample's loss, but kept on the device). Penalties that are not a per-sample loss
(EWC, SI, MAS, FedProx) are refused: per-sample clipping would drop their gradient, and their
importance weights are computed from the data outside any clipping.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from client.learner import LocalTraining, TrainStats, batch_loss
from client.methods import Method
from common.datasets import LabelledSplit
from common.errors import FedtideError
from common.sections import PrivacySettings

STEPS_KEY = "dp.steps"  # client state: rows of (noise multiplier, sampling rate, steps)
MAX_HISTORY_ROWS = 1_000_000  # a state file claiming more is refused (rows merge when equal)


@dataclass
class SampleBudget:
    """A client's DP-SGD history: (noise, rate, steps) rows; equal (noise, rate) rows merge."""

    rows: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "SampleBudget":
        saved = state.get(STEPS_KEY)
        if saved is None:
            return cls()
        if (saved.dim() != 2 or saved.shape[1] != 3 or saved.shape[0] > MAX_HISTORY_ROWS
                or not torch.isfinite(saved).all() or (saved < 0).any() or (saved[:, 1] > 1).any()):
            # a privacy history must never be silently shortened: a broken one stops the client
            raise FedtideError(f"the client state's DP history '{STEPS_KEY}' is damaged ({tuple(saved.shape)}): the "
                               "budget this device spent is unknown; restore the state folder from a backup")
        return cls([(float(n), float(q), int(s)) for n, q, s in saved.tolist()])

    def add(self, noise: float, rate: float, steps: int) -> None:
        for i, (n, q, s) in enumerate(self.rows):
            if n == noise and q == rate:
                self.rows[i] = (n, q, s + steps)
                return
        self.rows.append((noise, rate, steps))

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        """Epsilon at ``delta`` by Opacus's RDP accountant (its orders), after the steps so far
        (and ``extra``)."""
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        rows = [*self.rows, *([extra] if extra else [])]
        if not any(steps for _, _, steps in rows):
            return 0.0
        orders = RDPAccountant.DEFAULT_ALPHAS
        total = sum(torch.as_tensor(compute_rdp(q=q, noise_multiplier=n, steps=s, orders=orders), dtype=torch.float64)
                    for n, q, s in rows if s)
        epsilon, _ = get_privacy_spent(orders=orders, rdp=total.numpy(), delta=delta)
        return float(epsilon)

    def state(self) -> dict[str, torch.Tensor]:
        return {STEPS_KEY: torch.tensor(self.rows, dtype=torch.float64).reshape(-1, 3)}


def _memory(methods: list[Method]):
    return next((m for m in methods if hasattr(m, "draw_poisson")), None)


def planned_steps(data_size: int, batch_size: int, epochs: int) -> int:
    """Steps a round takes: as many as a pass of fixed batches would, per epoch."""
    return epochs * max(1, math.ceil(data_size / batch_size))


def step_rate(data_size: int, memories: int, training: LocalTraining, ratio: float) -> tuple[float, float, float]:
    """(q for new samples, q for memories, the worse of the two: the accountant's rate)."""
    q = min(1.0, training.batch_size / max(data_size, 1))
    q_mem = min(1.0, ratio * training.batch_size / memories) if memories else 0.0
    return q, q_mem, max(q, q_mem)


def train_private(
    model: nn.Module,
    data: LabelledSplit,
    methods: list[Method],
    training: LocalTraining,
    privacy: PrivacySettings,
    state: dict[str, torch.Tensor],
    generator: torch.Generator,
    device: torch.device,
    observe: bool = True,
    continuing: bool = False,
) -> TrainStats:
    """A stretch of DP-SGD with the budget kept in ``state``; with ``--target-epsilon``, no
    training at all when it would pass the target (the stats say ``budget_spent``)."""
    budget = SampleBudget.from_state(state)
    # the noise's seed: drawn from the round's stream (research, --dp-reproducible), else the OS's entropy
    drawn = int(torch.randint(0, 2**62, (1,), generator=generator))
    seed = drawn if privacy.dp_reproducible else int.from_bytes(os.urandom(8), "little") >> 1
    memory = _memory(methods)
    rate = step_rate(len(data), memory.memory_size() if memory is not None else 0, training,
                     memory.ratio if memory is not None else 0.0)[2]
    steps = planned_steps(len(data), training.batch_size, training.epochs)
    if privacy.target_epsilon and budget.epsilon(privacy.dp_delta, (privacy.dp_noise, rate, steps)) > privacy.target_epsilon:
        errors = _errors(model, data.x.to(device), data.y.to(device))
        return TrainStats(num_examples=len(data), loss=0.0, epochs=0, errors=errors,
                          prequential_accuracy=1.0 - float(errors.float().mean()) if len(errors) else 0.0,
                          privacy_state=budget.state(), epsilon=budget.epsilon(privacy.dp_delta), budget_spent=True)
    if not continuing:
        for method in methods:
            method.start_round(model)
    stats = train_local_dp(model, data, methods, training, privacy.dp_noise, privacy.dp_clip, seed, budget, generator,
                           device, observe)
    return dataclasses.replace(stats, privacy_state=budget.state(), epsilon=budget.epsilon(privacy.dp_delta))


def train_local_dp(
    model: nn.Module,
    data: LabelledSplit,
    methods: list[Method],
    training: LocalTraining,
    noise: float,
    clip: float,
    seed: int,
    budget: SampleBudget,
    generator: torch.Generator,
    device: torch.device,
    observe: bool = True,
) -> TrainStats:
    """DP-SGD for ``training.epochs`` epochs over ``data`` (noise multiplier ``noise``, each
    sample's gradient clipped to ``clip``, the noise drawn from ``seed``); the steps are added
    to ``budget``.

    Prequential accuracy: every new sample predicted by the received model, before training
    (Poisson batches show a sample any number of times, so there is no "first time" to
    predict at)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    x_all, y_all = data.x.to(device), data.y.to(device)
    errors = _errors(model, x_all, y_all)
    memory = _memory(methods)
    memories = memory.memory_size() if memory is not None else 0
    ratio = memory.ratio if memory is not None else 0.0
    q, q_mem, rate = step_rate(len(data), memories, training, ratio)
    steps = planned_steps(len(data), training.batch_size, training.epochs)
    noise_generator = torch.Generator(device=device).manual_seed(seed)
    model.train()
    wrapped = GradSampleModule(model, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.Adam(params, lr=training.lr) if training.optimizer == "adam" else torch.optim.SGD(params, lr=training.lr)
    expected = max(1, round(q * len(data) + q_mem * memories))
    optimizer = DPOptimizer(inner, noise_multiplier=noise, max_grad_norm=clip, expected_batch_size=expected,
                            loss_reduction="mean", generator=noise_generator)
    if memory is not None:
        memory.draw_poisson(q_mem, generator)
    loss_sum = 0.0
    try:
        for _ in range(steps):
            chosen = (torch.rand(len(data), generator=generator) < q).nonzero().flatten().to(device)
            xb, yb = x_all[chosen], y_all[chosen]
            for method in methods:
                xb, yb = method.extend_batch(xb, yb)
            optimizer.zero_grad(set_to_none=True)
            if len(yb) == 0:  # an empty draw is still a step: the noise alone moves the model
                for p in params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
                optimizer.step()
                continue
            loss = batch_loss(methods, model, xb, yb, wrapped(xb), len(chosen))
            with warnings.catch_warnings():  # the first layer's input needs no gradient: Opacus's hooks say so
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach())
    finally:
        if memory is not None:
            memory.draw_poisson(None)
        wrapped._close()
    budget.add(noise, rate, steps)
    if observe:  # only now: during training no sample was both new and a memory
        for start in range(0, len(data), training.batch_size):
            for method in methods:
                method.observe(data.x[start : start + training.batch_size], data.y[start : start + training.batch_size])
    return TrainStats(
        num_examples=len(data), loss=loss_sum / max(steps, 1),
        prequential_accuracy=1.0 - float(errors.float().mean()) if len(errors) else 0.0,
        errors=errors, epochs=training.epochs,
    )


def _errors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        wrong = torch.cat([model(x[i : i + 1024]).argmax(dim=1) != y[i : i + 1024] for i in range(0, len(y), 1024)]) \
            if len(y) else torch.zeros(0, dtype=torch.bool)
    model.train(was_training)
    return wrong.to(torch.uint8).cpu()
