"""What SI and MAS share: a quadratic pull of each weight towards its value at the last task
boundary, in proportion to how much that weight mattered to the tasks before.

penalty = strength * sum_i omega_i (theta_i - anchor_i)^2, zero at the anchor. Neither keeps
a sample: SI's importance comes from the training steps themselves, MAS's from the output's
sensitivity on each round's new data, measured in that round.

The boundary is the one a client can observe (``start_data``: labels it never had, or a
drift its detector found), never the scenario's task ids.
"""

from __future__ import annotations

import torch
from torch import nn

from client.methods.base import Method
from client.methods.boundary import TaskBoundary
from client.methods.terms import Pull
from common.datasets import LabelledSplit


class ImportanceMethod(Method):
    excludes: tuple[str, ...] = ()

    def __init__(self, strength: float, max_coefficient: float = float("inf")) -> None:
        self.strength = strength
        # as EWC's cap: one SGD step never overshoots the anchor (1 / learning rate)
        self.max_coefficient = max_coefficient
        self.omega: dict[str, torch.Tensor] = {}  # consolidated importance of the tasks before
        self.anchor: dict[str, torch.Tensor] = {}  # the weights at the last boundary
        self.boundary = TaskBoundary()

    def start_data(self, model, data, drifted):
        boundary = self.boundary.see(data.y, drifted)
        if boundary:
            self.consolidate(model)
        elif not self.anchor:
            self.anchor = _weights(model)  # the first task's start: where SI measures its path from
        self.measure(model, data)

    def consolidate(self, model: nn.Module) -> None:
        """A task ended with ``model``: fold what this task's weights mattered into ``omega``."""

    def measure(self, model: nn.Module, data: LabelledSplit) -> None:
        """Before training on a round's data (MAS measures its importance here)."""

    def penalty(self, model, x, logits):
        if not self.omega:
            return None
        total = logits.new_zeros(())
        for name, param in model.named_parameters():
            omega, anchor = self.omega.get(name), self.anchor.get(name)
            if omega is None or anchor is None or omega.shape != param.shape or anchor.shape != param.shape:
                continue  # not this model's (a state of other settings): no pull rather than a crash
            # the penalty's gradient is 2 c (theta - anchor): half the cap keeps a step from overshooting
            coefficient = (self.strength * omega.to(param.device)).clamp(max=self.max_coefficient / 2)
            total = total + (coefficient * (param - anchor.to(param.device)) ** 2).sum()
        return total

    def round_terms(self):
        if not self.omega:
            return []
        names = [n for n in self.omega if n in self.anchor]  # the batched loss skips shapes not the model's
        return [Pull({n: (self.strength * self.omega[n]).clamp(max=self.max_coefficient / 2) for n in names},
                     {n: self.anchor[n] for n in names})]

    def state(self):
        out = {f"omega.{n}": t for n, t in self.omega.items()}
        out.update({f"anchor.{n}": t for n, t in self.anchor.items()})
        return {**out, **self.boundary.state()}

    def load_state(self, state, device):
        self.omega = {k.removeprefix("omega."): v.float().clamp(min=0).nan_to_num(0.0, 0.0, 0.0).to(device)
                      for k, v in state.items() if k.startswith("omega.")}
        self.anchor = {k.removeprefix("anchor."): v.float().to(device)
                       for k, v in state.items() if k.startswith("anchor.")}
        self.boundary.load_state(state)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, copied where they are (the state goes to the CPU when it is saved)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}
