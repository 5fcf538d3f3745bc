"""Synaptic intelligence."""

from __future__ import annotations

import torch

from client.methods.importance import ImportanceMethod, _weights
from common.method_registry import register_method
from common.settings import Setting

DAMPING = 0.1  # xi: keeps a weight that hardly moved from taking an unbounded importance


@register_method
class SynapticIntelligence(ImportanceMethod):
    """Synaptic intelligence (Zenke, Poole & Ganguli, ICML 2017): each training step adds
    -gradient x step to a weight's path integral, how much moving that weight lowered the
    loss; at a task boundary the integral, divided by the weight's squared total move over
    the task (plus ``DAMPING``), joins its importance. In a federation a client integrates
    its own local steps; the total move is the global model's, from the last boundary to this.
    """

    name = "si"
    order = 32  # where its hooks run among the methods'
    settings = (Setting("si-c", float, 1.0, "SI penalty strength", minimum=0),)

    @classmethod
    def from_options(cls, options, seed, lr):
        return cls(options["si-c"], max_coefficient=1.0 / lr)

    def __init__(self, strength: float, max_coefficient: float = float("inf")) -> None:
        super().__init__(strength, max_coefficient)
        self.path: dict[str, torch.Tensor] = {}  # this task's path integral so far
        self._before: dict[str, torch.Tensor] = {}

    def start_round(self, model):
        self._before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def after_step(self, model):
        for name, param in model.named_parameters():
            before = self._before.get(name)
            if before is None or param.grad is None:
                continue
            gain = -param.grad.detach() * (param.detach() - before)  # where the weights are: no copy per step
            if name in self.path and self.path[name].shape == gain.shape:
                self.path[name].add_(gain.to(self.path[name].device))
            else:
                self.path[name] = gain
            before.copy_(param.detach())

    def consolidate(self, model):
        now = _weights(model)
        for name, total in self.path.items():
            start = self.anchor.get(name)
            if start is None or start.shape != total.shape:
                continue
            total, start = total.to(now[name].device), start.to(now[name].device)
            gained = (total.clamp(min=0) / ((now[name] - start) ** 2 + DAMPING))
            self.omega[name] = self.omega.get(name, torch.zeros_like(gained)) + gained
        self.path = {}
        self.anchor = now

    def state(self):
        return {**super().state(), **{f"path.{n}": t for n, t in self.path.items()}}

    def load_state(self, state, device):
        super().load_state(state, device)
        self.path = {k.removeprefix("path."): v.float().nan_to_num(0.0, 0.0, 0.0).to(device)
                     for k, v in state.items() if k.startswith("path.")}
