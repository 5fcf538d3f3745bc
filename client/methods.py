"""Continual-learning methods as small hooks on one training loop.

A method may
- ``start_task``: consolidate when the client moves to a new task (EWC computes the
  Fisher of the old task, LwF freezes the old model as teacher);
- ``start_round``: see the global model the server just sent (FedProx keeps it);
- ``extend_batch``: add samples to a batch (replay mixes in memories);
- ``penalty``: add a term to the loss (EWC, LwF, FedProx);
- ``observe``: see each new sample once, after it was trained on (replay stores it).
Methods compose: ``replay+ewc`` with ``--prox-mu 0.01`` runs all three hooks on one loop.
Each method's state is a flat dict of tensors, so it can live in memory or on disk.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from client.replay import ReplayBuffer
from common.config import RunConfig
from common.datasets import LabelledSplit
from common.seeding import derive_seed
from common.transforms import random_shifts


SHIFT_STREAM = 1  # derive_seed(seed, SHIFT_STREAM): the replay shifts' random stream


class Method:
    name = "method"

    def start_task(self, model: nn.Module, previous: LabelledSplit | None) -> None:
        pass

    def start_round(self, model: nn.Module) -> None:
        pass

    def extend_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def penalty(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def observe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        pass

    def classification_loss(self, logits: torch.Tensor, y: torch.Tensor, num_new: int) -> torch.Tensor | None:
        """Replace the plain cross-entropy on the (extended) batch; None keeps it."""
        return None

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore from ``state()``'s output (CPU tensors); move what training needs to ``device``."""


class Replay(Method):
    """Experience replay: each batch of new data is joined by ``ratio`` times as many
    remembered samples, drawn uniformly from a reservoir of the whole stream.

    With ``shift`` > 0 each replayed image is moved by a fresh random offset of up to that
    many pixels (independent buffer augmentation, Buzzega et al., ICPR 2020): a memory
    replayed a hundred times is then not the same hundred times, so the model learns the
    task from it rather than the memory itself. The new data is left as it is.
    """

    name = "replay"

    def __init__(self, capacity: int, seed: int, ratio: float = 1.0, asymmetric: bool = False, shift: int = 0) -> None:
        self.buffer = ReplayBuffer(capacity, seed)
        self.ratio = ratio
        self.asymmetric = asymmetric
        self.shift = shift
        # shifts have their own stream, so turning them on changes how memories look, not which
        # samples the reservoir keeps or replays
        self.shift_generator = torch.Generator().manual_seed(derive_seed(seed, SHIFT_STREAM))
        self._drawn: torch.Tensor | None = None  # buffer slots replayed in the current batch

    def classification_loss(self, logits, y, num_new):
        """ER-ACE (Caccia et al., ICLR 2022): new samples compete only among the classes of
        the incoming batch, so learning them does not push down old classes' logits;
        remembered samples use the full cross-entropy."""
        if not self.asymmetric or num_new == logits.shape[0]:
            return None
        new_logits, new_y = logits[:num_new], y[:num_new]
        present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        present[new_y] = True
        masked = new_logits.masked_fill(~present, torch.finfo(logits.dtype).min)
        new_loss = F.cross_entropy(masked, new_y, reduction="sum")
        old_loss = F.cross_entropy(logits[num_new:], y[num_new:], reduction="sum")
        return (new_loss + old_loss) / logits.shape[0]

    def extend_batch(self, x, y):
        """The batch, then the replayed memories (the tail of the returned batch)."""
        if len(self.buffer) == 0:
            self._drawn = None
            return x, y
        slots = self.buffer.sample_slots(max(1, round(x.shape[0] * self.ratio)))
        self._drawn = slots
        assert self.buffer.x is not None and self.buffer.y is not None
        old_x = random_shifts(self.buffer.x[slots], self.shift, self.shift_generator)
        return torch.cat([x, old_x.to(x.device)]), torch.cat([y, self.buffer.y[slots].to(y.device)])

    def observe(self, x, y):
        self.buffer.add(x, y)

    def state(self):
        return {**self.buffer.state(), "shift_rng": self.shift_generator.get_state()}

    def load_state(self, state, device):
        self.buffer.load_state(state)  # the memory stays on the CPU; batches move
        if "shift_rng" in state:
            self.shift_generator.set_state(state["shift_rng"])


class DarkReplay(Replay):
    """Dark experience replay (DER++, Buzzega et al., NeurIPS 2020): replay whose memories
    also keep the model's logits, matched by a squared error beside the cross-entropy on
    their labels. A logit vector says more than a label (how much a 7 looks like a 1), so
    the few memories are not simply learned by heart.

    Logits are taken when a task ends, from the model the client starts the next task
    with: the global model after the task's last round, which learned it from every
    client. (DER proper keeps the logits seen when a sample arrived; in a federation that
    is the model before it learned the new task, whose outputs on it are poor.) Memories
    of the task still running have no logits yet and only their labels count.

    penalty = weight * mean over the replayed memories with logits of (z - z_stored)^2,
    averaged over classes as well.
    """

    name = "der"

    def __init__(
        self, capacity: int, seed: int, weight: float, ratio: float = 1.0, asymmetric: bool = False, shift: int = 0
    ) -> None:
        super().__init__(capacity, seed, ratio, asymmetric, shift)
        self.weight = weight
        self.logits: torch.Tensor | None = None  # [capacity, classes], by buffer slot
        self.known = torch.zeros(capacity, dtype=torch.bool)  # slots whose logits are set

    def start_task(self, model, previous):
        pending = (~self.known[: len(self.buffer)]).nonzero().flatten()
        if len(pending) == 0 or self.buffer.x is None:
            return
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(self.buffer.x[pending].to(device)).float().cpu()
        model.train(was_training)
        if self.logits is None:
            self.logits = torch.zeros((self.buffer.capacity, logits.shape[1]))
        self.logits[pending] = logits
        self.known[pending] = True

    def penalty(self, model, x, logits):
        if self._drawn is None or self.logits is None:
            return None
        keep = self.known[self._drawn]
        if not bool(keep.any()):
            return None
        # replay is the first method to extend a batch, and the only one: its memories are the tail
        replayed = logits[logits.shape[0] - len(self._drawn) :][keep.to(logits.device)]
        target = self.logits[self._drawn[keep]].to(logits.device)
        return self.weight * F.mse_loss(replayed, target)

    def observe(self, x, y):
        written = self.buffer.add(x, y)
        if written:
            self.known[written] = False

    def state(self):
        out = super().state()
        size = len(self.buffer)
        out["known"] = self.known[:size].clone()
        if self.logits is not None:
            out["logits"] = self.logits[:size].clone()
        return out

    def load_state(self, state, device):
        super().load_state({k: v for k, v in state.items() if k not in ("known", "logits")}, device)
        self.known = torch.zeros(self.buffer.capacity, dtype=torch.bool)
        self.logits = None
        if "known" in state:
            keep = min(len(state["known"]), self.buffer.capacity)
            self.known[:keep] = state["known"][:keep]
        if "logits" in state:
            stored = state["logits"]
            self.logits = torch.zeros((self.buffer.capacity, stored.shape[1]))
            keep = min(len(stored), self.buffer.capacity)
            self.logits[:keep] = stored[:keep]


class EWC(Method):
    """Elastic weight consolidation with a diagonal Fisher, accumulated over tasks (online EWC).

    penalty = 1/2 * sum_i c_i (theta_i - anchor_i)^2 with c_i = min(lambda * F_i, max_coefficient),
    zero at the anchor. The cap (1 / learning rate for SGD) keeps one gradient step from
    overshooting the anchor: without it a large Fisher entry makes training diverge.
    """

    name = "ewc"

    def __init__(self, strength: float, max_coefficient: float = float("inf")) -> None:
        self.strength = strength
        self.max_coefficient = max_coefficient
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def start_task(self, model, previous):
        if previous is None or len(previous) == 0:
            return
        new_fisher = diagonal_fisher(model, previous)
        for name, value in new_fisher.items():
            self.fisher[name] = self.fisher.get(name, torch.zeros_like(value)) + value
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}

    def penalty(self, model, x, logits):
        if not self.anchor:
            return None
        total = logits.new_zeros(())
        for name, param in model.named_parameters():
            coefficient = (self.strength * self.fisher[name]).clamp(max=self.max_coefficient)
            total = total + (coefficient * (param - self.anchor[name]) ** 2).sum()
        return 0.5 * total

    def state(self):
        out = {f"fisher.{n}": t for n, t in self.fisher.items()}
        out.update({f"anchor.{n}": t for n, t in self.anchor.items()})
        return out

    def load_state(self, state, device):
        self.fisher = {k.removeprefix("fisher."): v.to(device) for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k.removeprefix("anchor."): v.to(device) for k, v in state.items() if k.startswith("anchor.")}


class LwF(Method):
    """Learning without forgetting: distil the previous task's model into the current one."""

    name = "lwf"

    def __init__(self, weight: float, temperature: float) -> None:
        self.weight = weight
        self.temperature = temperature
        self.teacher: nn.Module | None = None
        self._teacher_state: dict[str, torch.Tensor] = {}

    def start_task(self, model, previous):
        self._teacher_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.teacher = None

    def _teacher_for(self, model: nn.Module) -> nn.Module:
        if self.teacher is None:
            self.teacher = copy.deepcopy(model)
            self.teacher.load_state_dict(self._teacher_state)
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        return self.teacher

    def penalty(self, model, x, logits):
        if not self._teacher_state:
            return None
        t = self.temperature
        with torch.no_grad():
            target = F.softmax(self._teacher_for(model)(x) / t, dim=1)
        log_student = F.log_softmax(logits / t, dim=1)
        return self.weight * t * t * F.kl_div(log_student, target, reduction="batchmean")

    def state(self):
        return {f"teacher.{k}": v for k, v in self._teacher_state.items()}

    def load_state(self, state, device):
        self._teacher_state = {
            k.removeprefix("teacher."): v.to(device) for k, v in state.items() if k.startswith("teacher.")
        }
        self.teacher = None


class Proximal(Method):
    """FedProx's proximal term mu / 2 * ||theta - theta_global||^2 (Li et al., 2020)."""

    name = "prox"

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.global_params: list[torch.Tensor] = []

    def start_round(self, model):
        self.global_params = [p.detach().clone() for p in model.parameters()]

    def penalty(self, model, x, logits):
        total = logits.new_zeros(())
        for param, ref in zip(model.parameters(), self.global_params):
            total = total + ((param - ref) ** 2).sum()
        return 0.5 * self.mu * total


def diagonal_fisher(model: nn.Module, data: LabelledSplit, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: mean over samples of the squared per-sample gradient of
    the log-likelihood of the true label (per-sample gradients via torch.func)."""
    device = next(model.parameters()).device
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(p, x, y):
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device)
        y = data.y[start : start + batch_size].to(device)
        grads = per_sample_grad(params, x, y)
        for n, g in grads.items():
            fisher[n] += (g**2).sum(dim=0)
    return {n: f / len(data) for n, f in fisher.items()}


def build_methods(config: RunConfig, seed: int) -> list[Method]:
    """The hooks a config asks for, in a fixed order: replay (or der), ewc, lwf, then prox."""
    methods: list[Method] = []
    parts = config.methods
    memory = (config.effective_memory_size, seed)
    replay_options = {"ratio": config.replay_ratio, "asymmetric": config.replay_loss == "ace", "shift": config.replay_shift}
    if "replay" in parts:
        methods.append(Replay(*memory, **replay_options))
    if "der" in parts:
        methods.append(DarkReplay(*memory, config.der_alpha, **replay_options))
    if "ewc" in parts:
        methods.append(EWC(config.ewc_lambda, max_coefficient=1.0 / config.lr))
    if "lwf" in parts:
        methods.append(LwF(config.lwf_alpha, config.lwf_temperature))
    if config.prox_mu > 0:
        methods.append(Proximal(config.prox_mu))
    return methods
