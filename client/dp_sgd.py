"""Sample-level differential privacy on the device (``--dp sample``): DP-SGD with Opacus, and
the budget each client keeps on its own disk.

Each step draws its batch by Poisson sampling: every new sample of the round joins with
probability q = batch / new samples, and, with replay or der, every memory with probability
q_mem = replay-ratio * batch / memories (never twice in one batch). Opacus computes each
sample's gradient (``GradSampleModule``), clips it to L2 norm ``--dp-clip`` and adds Gaussian
noise of standard deviation ``--dp-noise * --dp-clip`` to the sum (``DPOptimizer``); the sum is
divided by the expected batch size.

**How memories are accounted.** A sample is the client's data while its task runs and joins
the memory when the task ends (``--memory-fill boundary``; ``stream``, which would make it a
memory while it is still data, is refused; an edge device retraining on its memory draws it
once, as data). It may then sit in the memory for the rest of the run. One step is a subsampled Gaussian mechanism at rate max(q, q_mem) for
whichever sample is worst placed; the client composes every step of every round it trains
(Opacus's RDP accountant), so a memory replayed in a hundred rounds pays in all of them. The
epsilon a client reports bounds every sample it ever held, memories included. Each arriving
sample is taken as a record of its own: a person behind many samples needs user-level
accounting, which this is not.

Outside the guarantee: what a client reports beside its weights (prequential accuracy, drift
flags, losses, counts), its drift detector's evidence, and the logits der stores (used only in
their own sample's loss, but kept on the device). Penalties that are not a per-sample loss
(EWC, SI, MAS, FedProx; generative replay) are refused: per-sample clipping would drop their gradient, and their
importance weights are computed from the data outside any clipping.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from client.learner import LocalTraining, TrainStats, batch_loss
from client.methods import Method
from common.datasets import LabelledSplit
from common.errors import FedtideError, require_opacus
from common.sections import PrivacySettings

STEPS_KEY = "dp.steps"  # client state: rows of (noise multiplier, sampling rate, steps)
MAX_HISTORY_ROWS = 10_000  # a state file claiming more is refused (rows merge when equal; rates have 2 digits)


def plausible_history(rows: torch.Tensor) -> bool:
    """Whether ``rows`` could be what an accountant wrote: [k, 3] rows of (noise >= 0.1, a rate
    in [0, 1], a step count), finite, not absurdly many."""
    return (rows.dim() == 2 and rows.shape[1] == 3 and rows.shape[0] <= MAX_HISTORY_ROWS
            and bool(torch.isfinite(rows).all()) and not bool((rows < 0).any()) and not bool((rows[:, 1] > 1).any())
            and not bool((rows[:, 0] < 0.1).any()) and not bool((rows[:, 2] > 1e12).any()))


@dataclass
class SampleBudget:
    """A client's DP-SGD history: (noise, rate, steps) rows; equal (noise, rate) rows merge."""

    rows: list[tuple[float, float, int]] = field(default_factory=list)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "SampleBudget":
        saved = state.get(STEPS_KEY)
        if saved is None:
            return cls()
        if not plausible_history(saved):
            # a privacy history must never be silently shortened: a broken one stops the client
            raise FedtideError(f"the client state's DP history '{STEPS_KEY}' is damaged ({tuple(saved.shape)}): the "
                               "budget this device spent is unknown; restore the state folder from a backup")
        return cls([(float(n), float(q), int(s)) for n, q, s in saved.tolist()])

    def add(self, noise: float, rate: float, steps: int) -> None:
        rate = rate_up(rate)
        for i, (n, q, s) in enumerate(self.rows):
            if n == noise and q == rate:
                self.rows[i] = (n, q, s + steps)
                return
        self.rows.append((noise, rate, steps))

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        """Epsilon at ``delta`` by Opacus's RDP accountant (its orders), after the steps so far
        (and ``extra``)."""
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rows = [*self.rows, *([(extra[0], rate_up(extra[1]), extra[2])] if extra else [])]
        if not any(steps for _, _, steps in rows):
            return 0.0
        total = sum(s * _one_step_rdp(n, q) for n, q, s in rows if s)  # RDP composes by adding
        epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
        return float(epsilon)

    def state(self) -> dict[str, torch.Tensor]:
        return {STEPS_KEY: torch.tensor(self.rows, dtype=torch.float64).reshape(-1, 3)}


_RDP: dict[tuple[float, float], "np.ndarray"] = {}  # one step's RDP per (noise, rate), at Opacus's orders


def _one_step_rdp(noise: float, rate: float):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    key = (noise, rate)
    if key not in _RDP:
        if len(_RDP) > 4096:
            _RDP.clear()
        _RDP[key] = np.asarray(compute_rdp(q=rate, noise_multiplier=noise, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))
    return _RDP[key]


def rate_up(rate: float) -> float:
    """``rate`` rounded up to two significant digits: a little more budget counted, and few
    distinct rates for the accountant (each is computed once)."""
    if rate <= 0 or rate >= 1:
        return min(max(rate, 0.0), 1.0)
    unit = 10.0 ** (math.floor(math.log10(rate)) - 1)
    return min(1.0, math.ceil(round(rate / unit, 9)) * unit)


def _memory(methods: list[Method]):
    return next((m for m in methods if hasattr(m, "draw_poisson")), None)


def _fingerprints(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One number per sample, equal for equal samples (a fixed random projection of its values
    and its label); two different samples share one only by chance, which excludes a memory
    that did not need it: never the other way."""
    flat = x.detach().cpu().reshape(len(x), -1).double()
    weights = torch.rand(flat.shape[1] + 1, generator=torch.Generator().manual_seed(0x5EED), dtype=torch.float64)
    return flat @ weights[:-1] + y.detach().cpu().double() * weights[-1]


def drawable(memory, data: LabelledSplit) -> tuple[torch.Tensor | None, int]:
    """(which memory slots a step may draw, how many): not those holding a sample of ``data``,
    which a step may already draw as data (a drift detected mid-task merges the task's samples
    into the memory while the task still trains on them), so that no sample is drawn twice."""
    samples = memory.memory_samples() if memory is not None else None
    if samples is None:
        return None, 0
    allowed = ~torch.isin(_fingerprints(*samples), _fingerprints(data.x, data.y))
    return allowed, int(allowed.sum())


def planned_steps(data_size: int, batch_size: int, epochs: int) -> int:
    """Steps a round takes: as many as a pass of fixed batches would, per epoch."""
    return epochs * max(1, math.ceil(data_size / batch_size))


def step_rate(data_size: int, memories: int, training: LocalTraining, ratio: float) -> tuple[float, float, float]:
    """(q for new samples, q for memories, the worse of the two: the accountant's rate)."""
    q = min(1.0, training.batch_size / max(data_size, 1))
    q_mem = min(1.0, ratio * training.batch_size / memories) if memories else 0.0
    return q, q_mem, max(q, q_mem)


def planned_round(methods: list[Method], data: LabelledSplit, training: LocalTraining, noise: float,
                  memories: bool) -> tuple[float, float, int]:
    """(noise, rate, steps): the row a stretch of ``train_local_dp`` will add to the budget."""
    memory = _memory(methods) if memories else None
    rate = step_rate(len(data), drawable(memory, data)[1], training, memory.ratio if memory is not None else 0.0)[2]
    return noise, rate, planned_steps(len(data), training.batch_size, training.epochs)


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
    memories: bool = True,
) -> TrainStats:
    """A stretch of DP-SGD with the budget kept in ``state``; with ``--target-epsilon``, no
    training at all when it would pass the target (the stats say ``budget_spent``).
    ``memories`` False: ``data`` is the memory (an edge device with nothing new), which is
    then not drawn a second time beside it."""
    budget = SampleBudget.from_state(state)
    # the noise and the batches' draws come from the operating system's entropy: subsampling
    # amplifies privacy only while no one can tell which samples a step drew, and the run's
    # seed is in its config.json. --dp-reproducible (research) draws both from the round's stream.
    drawn = int(torch.randint(0, 2**62, (1,), generator=generator))
    seed = drawn if privacy.dp_reproducible else int.from_bytes(os.urandom(8), "little") >> 1
    if not privacy.dp_reproducible:
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    require_opacus()
    if privacy.target_epsilon and budget.epsilon(privacy.dp_delta, planned_round(methods, data, training, privacy.dp_noise,
                                                                                  memories)) > privacy.target_epsilon:
        errors = _errors(model, data.x.to(device), data.y.to(device))
        return TrainStats(num_examples=len(data), loss=0.0, epochs=0, errors=errors,
                          prequential_accuracy=1.0 - float(errors.float().mean()) if len(errors) else 0.0,
                          privacy_state=budget.state(), epsilon=budget.epsilon(privacy.dp_delta), budget_spent=True)
    if not continuing:
        for method in methods:
            method.start_round(model)
    stats = train_local_dp(model, data, methods, training, privacy.dp_noise, privacy.dp_clip, seed, budget, generator,
                           device, observe, memories=memories)
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
    per_sample: str = "auto",
    memories: bool = True,
) -> TrainStats:
    """DP-SGD for ``training.epochs`` epochs over ``data`` (noise multiplier ``noise``, each
    sample's gradient clipped to ``clip``, the noise drawn from ``seed``); the steps are added
    to ``budget``. ``per_sample``: "auto" (``LinearSteps`` where it fits, else Opacus) or
    "opacus".

    Prequential accuracy: every new sample predicted by the received model, before training
    (Poisson batches show a sample any number of times, so there is no "first time" to
    predict at)."""
    x_all, y_all = data.x.to(device), data.y.to(device)
    errors = _errors(model, x_all, y_all)
    memory = _memory(methods)
    allowed, drawn = drawable(memory if memories else None, data)
    ratio = memory.ratio if memory is not None else 0.0
    q, q_mem, rate = step_rate(len(data), drawn, training, ratio)
    steps = planned_steps(len(data), training.batch_size, training.epochs)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.Adam(params, lr=training.lr) if training.optimizer == "adam" else torch.optim.SGD(params, lr=training.lr)
    expected = max(1, round(q * len(data) + q_mem * drawn))
    noise_generator = torch.Generator(device=device).manual_seed(seed)
    kind = LinearSteps if per_sample == "auto" and LinearSteps.fits(model) else OpacusSteps
    private = kind(model, inner, noise, clip, expected, noise_generator)
    if memory is not None:
        memory.draw_poisson(q_mem, generator, allowed)  # q_mem 0 when ``memories`` is False: none drawn
    loss_sum = 0.0
    try:
        for _ in range(steps):
            chosen = (torch.rand(len(data), generator=generator) < q).nonzero().flatten().to(device)
            xb, yb = x_all[chosen], y_all[chosen]
            for method in methods:
                xb, yb = method.extend_batch(xb, yb)
            if len(yb) == 0:  # an empty draw is still a step: the noise alone moves the model
                private.step(None)
                continue
            loss = batch_loss(methods, model, xb, yb, private.forward(xb), len(chosen))
            private.step(loss)
            loss_sum += float(loss.detach())
    finally:
        if memory is not None:
            memory.draw_poisson(None)
        private.close()
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


class OpacusSteps:
    """DP-SGD steps by Opacus: each sample's gradient materialised (``GradSampleModule``, any
    layer Opacus supports: the CNN's convolutions), clipped and noised by ``DPOptimizer``."""

    def __init__(self, model: nn.Module, inner: torch.optim.Optimizer, noise: float, clip: float, expected: int,
                 generator: torch.Generator) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.wrapped = GradSampleModule(model, loss_reduction="mean")
        self.optimizer = DPOptimizer(inner, noise_multiplier=noise, max_grad_norm=clip, expected_batch_size=expected,
                                     loss_reduction="mean", generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wrapped(x)

    def step(self, loss: torch.Tensor | None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if loss is None:
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            with warnings.catch_warnings():  # the first layer's input needs no gradient: Opacus's hooks say so
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                loss.backward()
        self.optimizer.step()

    def close(self) -> None:
        self.wrapped._close()
        for p in self.params:  # what DPOptimizer leaves on a parameter
            for name in ("summed_grad", "grad_sample"):
                if hasattr(p, name):
                    delattr(p, name)


class LinearSteps:
    """DP-SGD steps for a model whose trained layers are all ``nn.Linear`` on [batch, features]
    inputs (the MLP), with no per-sample gradient ever materialised ("ghost" norms, Li et al.,
    ICLR 2022). The loss is a mean over the n samples of the batch, so sample i's gradient of a
    layer is n * b_i a_i^T (a_i the layer's input, b_i the loss's gradient at its output): its
    squared norm is n^2 |b_i|^2 (|a_i|^2 + 1 with the bias), and the sum of the clipped
    gradients is (n c * B)^T A, one matrix product per layer. The same numbers as
    ``OpacusSteps`` to float rounding (tests), about 20 times faster here: Opacus writes out
    each sample's copy of every weight."""

    def __init__(self, model: nn.Module, inner: torch.optim.Optimizer, noise: float, clip: float, expected: int,
                 generator: torch.Generator) -> None:
        self.model, self.inner, self.noise, self.clip, self.expected = model, inner, noise, clip, expected
        self.generator = generator
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear) and any(p.requires_grad for p in m.parameters())]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.inputs: dict[nn.Module, list[torch.Tensor]] = {}
        self.grads: dict[nn.Module, list[torch.Tensor]] = {}
        self.handles = [layer.register_forward_hook(self._capture) for layer in self.layers]

    @staticmethod
    def fits(model: nn.Module) -> bool:
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        covered = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)
                   if p.requires_grad}
        return bool(trained) and trained == covered

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:  # a teacher's forward, or an evaluation
            return
        self.inputs.setdefault(module, []).append(inputs[0].detach())
        output.register_hook(lambda grad: self.grads.setdefault(module, []).append(grad.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.clear()
        self.grads.clear()
        return self.model(x)

    def step(self, loss: torch.Tensor | None) -> None:
        self.inner.zero_grad(set_to_none=True)
        summed: dict[int, torch.Tensor] = {}
        if loss is not None:
            loss.backward()
            summed = self._clipped_sum()
        for p in self.params:
            total = summed.get(id(p), torch.zeros_like(p))
            noise = torch.normal(0.0, self.noise * self.clip, size=p.shape, generator=self.generator, device=p.device,
                                 dtype=p.dtype) if self.noise else 0.0
            p.grad = (total + noise) / self.expected
        self.inner.step()

    def _clipped_sum(self) -> dict[int, torch.Tensor]:
        pairs = []
        for layer in self.layers:
            inputs, grads = self.inputs.get(layer, []), self.grads.get(layer, [])
            if len(inputs) != 1 or len(grads) != 1 or inputs[0].dim() != 2:
                raise RuntimeError(f"{type(layer).__name__} ran {len(inputs)} time(s) in one step, or on a "
                                   f"{inputs[0].dim() if inputs else 0}-d input: ghost clipping needs one [batch, "
                                   "features] pass per layer")
            pairs.append((layer, inputs[0], grads[0]))
        n = pairs[0][1].shape[0]
        squared = torch.zeros(n, dtype=torch.float64, device=pairs[0][1].device)
        for layer, a, b in pairs:
            b_sq = (b * b).sum(dim=1).double()
            if layer.weight.requires_grad:
                squared += (a * a).sum(dim=1).double() * b_sq
            if layer.bias is not None and layer.bias.requires_grad:
                squared += b_sq
        norms = n * squared.sqrt()
        factor = ((self.clip / (norms + 1e-6)).clamp(max=1.0) * n).to(pairs[0][1].dtype)
        out: dict[int, torch.Tensor] = {}
        for layer, a, b in pairs:
            scaled = b * factor[:, None]
            if layer.weight.requires_grad:
                out[id(layer.weight)] = scaled.T @ a
            if layer.bias is not None and layer.bias.requires_grad:
                out[id(layer.bias)] = scaled.sum(dim=0)
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
