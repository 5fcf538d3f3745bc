"""Learning without forgetting."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from client.methods.base import Method
from client.methods.terms import Distill
from common.method_registry import register_method
from common.settings import Setting


@register_method
class LwF(Method):
    """Learning without forgetting: distil the previous task's model into the current one."""

    name = "lwf"
    vectorized = True
    order = 40  # where its hooks run among the methods'
    settings = (
        Setting("lwf-alpha", float, 1.0, "LwF distillation weight", minimum=0),
        Setting("lwf-temperature", float, 2.0, "LwF distillation temperature", minimum=0, above=True),
    )

    @classmethod
    def from_options(cls, options, seed, lr):
        return cls(options["lwf-alpha"], options["lwf-temperature"])

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

    def round_terms(self):
        return [Distill(self._teacher_state, self.weight, self.temperature)] if self._teacher_state else []

    def state(self):
        return {f"teacher.{k}": v for k, v in self._teacher_state.items()}

    def load_state(self, state, device):
        self._teacher_state = {
            k.removeprefix("teacher."): v.to(device) for k, v in state.items() if k.startswith("teacher.")
        }
        self.teacher = None
