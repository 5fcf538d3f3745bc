"""FedProx's proximal term, on the clients (any method may add it)."""

from __future__ import annotations

import torch

from client.methods.base import Method
from client.methods.terms import Pull
from common.method_registry import register_method
from common.settings import Setting


@register_method
class Proximal(Method):
    """FedProx's proximal term mu / 2 * ||theta - theta_global||^2 (Li et al., 2020)."""

    name = "prox"
    vectorized = True
    order = 50  # where its hooks run among the methods'
    settings = (Setting("prox-mu", float, 0.0, "FedProx proximal term on clients (0: off); works with any method",
                        minimum=0),)
    selectable = False

    @classmethod
    def active(cls, parts, options):
        return options["prox-mu"] > 0

    @classmethod
    def from_options(cls, options, seed, lr):
        return cls(options["prox-mu"])

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.global_params: list[torch.Tensor] = []
        self.names: list[str] = []

    def start_round(self, model):
        self.global_params = [p.detach().clone() for p in model.parameters()]
        self.names = [n for n, _ in model.named_parameters()]

    def round_terms(self):
        return [Pull({n: 0.5 * self.mu for n in self.names}, dict(zip(self.names, self.global_params)))]

    def penalty(self, model, x, logits):
        total = logits.new_zeros(())
        for param, ref in zip(model.parameters(), self.global_params):
            total = total + ((param - ref) ** 2).sum()
        return 0.5 * self.mu * total
