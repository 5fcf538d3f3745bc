"""Dark experience replay (DER++)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from client.methods.replay import MEMORY_SETTINGS, Replay, check_memory_options
from client.methods.terms import MatchLogits
from common.method_registry import register_method
from common.settings import Setting


@register_method
class DarkReplay(Replay):
    """Dark experience replay (DER++, Buzzega et al., NeurIPS 2020): replay whose memories
    also keep the model's logits, matched by a squared error beside the cross-entropy on
    their labels. A logit vector says more than a label (how much a 7 looks like a 1), so
    the few memories are not simply learned by heart.

    Logits are taken when a task ends, from the model the client starts the next task
    with: the global model after the task's last round, which learned it from every
    client (with the memory filled at a boundary: when the task's samples join the memory). (DER proper keeps the logits seen when a sample arrived; in a federation that
    is the model before it learned the new task, whose outputs on it are poor.) Memories
    of the task still running have no logits yet and only their labels count.

    penalty = weight * mean over the replayed memories with logits of (z - z_stored)^2,
    averaged over classes as well.
    """

    name = "der"
    order = 20  # where its hooks run among the methods'
    settings = (*MEMORY_SETTINGS, Setting(
        "der-alpha", float, 0.2,
        "der: weight of the squared error that keeps replayed logits near those stored at the end of their task",
        minimum=0,
    ))
    excludes = ("replay",)

    @classmethod
    def exclusion_reason(cls, other):
        return "der is replay that also keeps logits, so it cannot be combined with replay; use der alone (e.g. der+lwf)"

    @classmethod
    def check(cls, parts, options, context):
        check_memory_options(options, context)

    @classmethod
    def from_options(cls, options, seed, lr):
        return cls(options["memory-size"], seed, options["der-alpha"], options["replay-ratio"],
                   options["replay-loss"] == "ace", options["replay-shift"], options["memory-policy"],
                   options["memory-fill"])

    def __init__(
        self, capacity: int, seed: int, weight: float, ratio: float = 1.0, asymmetric: bool = False, shift: int = 0,
        policy: str = "class-balanced", fill: str = "boundary",
    ) -> None:
        super().__init__(capacity, seed, ratio, asymmetric, shift, policy, fill)
        self.weight = weight
        self.logits: torch.Tensor | None = None  # [capacity, classes], by buffer slot
        self.known = torch.zeros(capacity, dtype=torch.bool)  # slots whose logits are set

    def start_task(self, model, previous):
        self._label(model)

    def end_stage(self, model):
        written = super().end_stage(model)
        if written:
            self.known[written] = False
            self._label(model)
        return written

    def _label(self, model) -> None:
        """Store the model's logits for the memories that have none."""
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
        if self._poisson is not None:  # DP-SGD: a sum of per-sample terms over the batch, as the losses are
            return self.weight * ((replayed - target) ** 2).mean(dim=1).sum() / logits.shape[0]
        return self.weight * F.mse_loss(replayed, target)

    def batch_terms(self, batch_size, num_new):
        terms = super().batch_terms(batch_size, num_new)
        if self._drawn is None or self.logits is None or self._poisson is not None:
            return terms
        keep = self.known[self._drawn]
        if not bool(keep.any()):
            return terms
        rows = torch.arange(batch_size - len(self._drawn), batch_size)[keep]
        return [*terms, MatchLogits(rows, self.logits[self._drawn[keep]], self.weight)]

    def observe(self, x, y):
        if self.stage is not None:
            self.stage.add(x, y)  # logits come when they join the memory
            return
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
        if self.moved_on_load:
            self.known[self.moved_on_load] = False
