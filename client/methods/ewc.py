"""Elastic weight consolidation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from client.methods.base import Method
from client.methods.terms import Pull
from common.datasets import LabelledSplit
from common.method_registry import register_method
from common.settings import Setting


@register_method
class EWC(Method):
    """Elastic weight consolidation with a diagonal Fisher, accumulated over tasks (online EWC).

    penalty = 1/2 * sum_i c_i (theta_i - anchor_i)^2 with c_i = min(lambda * F_i, max_coefficient),
    zero at the anchor. The cap (1 / learning rate for SGD) keeps one gradient step from
    overshooting the anchor: without it a large Fisher entry makes training diverge.
    """

    name = "ewc"
    vectorized = True
    order = 30  # where its hooks run among the methods'
    settings = (Setting("ewc-lambda", float, 50.0, "EWC penalty strength", minimum=0),)

    @classmethod
    def from_options(cls, options, seed, lr):
        return cls(options["ewc-lambda"], max_coefficient=1.0 / lr)

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
            fisher, anchor = self.fisher.get(name), self.anchor.get(name)
            if fisher is None or anchor is None or fisher.shape != param.shape or anchor.shape != param.shape:
                continue  # not this model's (a state of other settings): no pull rather than a crash
            coefficient = (self.strength * fisher).clamp(max=self.max_coefficient)
            total = total + (coefficient * (param - anchor) ** 2).sum()
        return 0.5 * total

    def round_terms(self):
        if not self.anchor:
            return []
        names = [n for n in self.fisher if n in self.anchor]  # the batched loss skips shapes not the model's
        return [Pull({n: 0.5 * (self.strength * self.fisher[n]).clamp(max=self.max_coefficient) for n in names},
                     {n: self.anchor[n] for n in names})]

    def state(self):
        out = {f"fisher.{n}": t for n, t in self.fisher.items()}
        out.update({f"anchor.{n}": t for n, t in self.anchor.items()})
        return out

    def load_state(self, state, device):
        # a Fisher is a mean of squares: never negative or NaN, whatever a saved file holds
        self.fisher = {k.removeprefix("fisher."): v.float().nan_to_num(0.0, 0.0, 0.0).clamp(min=0).to(device)
                       for k, v in state.items() if k.startswith("fisher.")}
        self.anchor = {k.removeprefix("anchor."): v.float().to(device) for k, v in state.items() if k.startswith("anchor.")}



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
