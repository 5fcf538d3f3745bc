"""Memory aware synapses."""

from __future__ import annotations

import torch
from torch import nn

from client.methods.base import saved_int
from client.methods.importance import ImportanceMethod, _weights
from common.method_registry import register_method
from common.settings import Setting

MEASURE_SAMPLES = 256  # the round's new samples MAS measures its importance on


@register_method
class MemoryAwareSynapses(ImportanceMethod):
    """Memory aware synapses (Aljundi et al., ECCV 2018): a weight's importance is the
    absolute gradient of the L2 norm of the model's output (mean over samples), how much the function the
    model computes changes when that weight moves; no label is needed. Each round, before it
    trains, the client measures it with the received model on up to ``MEASURE_SAMPLES`` of the
    round's new samples; at a task boundary the mean over the task's rounds joins the
    importance, and the received model becomes the anchor.
    """

    name = "mas"
    vectorized = True  # it measures before training, on the received model; SI integrates every step
    order = 34  # where its hooks run among the methods'
    settings = (Setting("mas-lambda", float, 1.0, "MAS penalty strength", minimum=0),)

    @classmethod
    def from_options(cls, options, seed, lr):
        return cls(options["mas-lambda"], max_coefficient=1.0 / lr)

    def __init__(self, strength: float, max_coefficient: float = float("inf")) -> None:
        super().__init__(strength, max_coefficient)
        self.running: dict[str, torch.Tensor] = {}  # this task's importance, summed over its rounds
        self.rounds = 0

    def consolidate(self, model):
        if self.rounds:
            for name, total in self.running.items():
                mean = total / self.rounds
                self.omega[name] = self.omega.get(name, torch.zeros_like(mean)) + mean
        self.running, self.rounds = {}, 0
        self.anchor = _weights(model)

    def measure(self, model, data):
        if len(data) == 0:
            return
        importance = output_sensitivity(model, data.x[:MEASURE_SAMPLES])
        for name, value in importance.items():
            self.running[name] = self.running.get(name, torch.zeros_like(value)) + value
        self.rounds += 1

    def state(self):
        out = {**super().state(), **{f"running.{n}": t for n, t in self.running.items()}}
        out["rounds"] = torch.tensor(self.rounds)
        return out

    def load_state(self, state, device):
        super().load_state(state, device)
        self.running = {k.removeprefix("running."): v.float().clamp(min=0).nan_to_num(0.0, 0.0, 0.0).to(device)
                        for k, v in state.items() if k.startswith("running.")}
        self.rounds = saved_int(state, "rounds", 0, 0, 1_000_000_000)


def output_sensitivity(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """|d mean ||model(x)|| / d theta| per parameter, over ``x``: the L2 norm of the output,
    not its square, whose gradients grow with the logits' scale and stiffen every weight at
    once. One batched backward gives the gradient of the mean, not the mean of per-sample
    absolute gradients, as MAS's own implementation does per batch."""
    was_training = model.training
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    device = next(model.parameters()).device
    out = model(x.to(device))
    norms = out.norm(dim=1).mean()
    grads = torch.autograd.grad(norms, [p for _, p in params])
    model.train(was_training)
    return {n: g.detach().abs() for (n, _), g in zip(params, grads)}
