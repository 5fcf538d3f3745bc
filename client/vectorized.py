"""Train many clients' rounds as one vectorised computation.

When every client of a round runs plain SGD with no method hooks, their local training is
the same program on different data: stacking their weights along a new leading axis turns
K small matrix products into one batched product (``baddbmm``), and one backward pass of
the sum of the clients' losses gives every client its own gradient. This covers the MLP;
other models take the one-client-at-a-time path. Each client still shuffles with its own
generator, sees its own samples in its own order, and gets its own prequential errors, so
the result equals K separate ``train_local`` calls up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from client.learner import TrainStats
from client.rounds import RoundPlan, TrainOutcome, finish_round, plan_round
from common.config import RunConfig
from common.devices import resolve_device
from common.models import MLP, build_model
from common.scenarios import build_scenario


def can_vectorize(config: RunConfig) -> bool:
    """Plain SGD with no per-client hooks: no methods, no proximal term, no frozen layers."""
    return (
        not config.methods
        and config.prox_mu == 0
        and config.optimizer == "sgd"
        and not config.frozen_prefixes
        and config.training != "local-only"
    )


def train_rounds_together(
    config: RunConfig,
    jobs: list[tuple[int, int, dict[str, torch.Tensor]]],
    weights: dict[str, torch.Tensor],
) -> list[TrainOutcome] | None:
    """``jobs``: (partition id, server round, state) per client, all starting from ``weights``.
    Returns one outcome per job, or None when these clients cannot share one computation
    (then the caller trains them one by one)."""
    if not jobs or not can_vectorize(config):
        return None
    plans = [plan_round(config, partition, server_round, state) for partition, server_round, state in jobs]
    sizes = {len(plan.data) for plan in plans}
    if len(sizes) != 1 or 0 in sizes or len({plan.lr for plan in plans}) != 1:
        return None  # unequal data: the clients' steps would not line up
    scenario = build_scenario(config)
    device = resolve_device(config.device)
    model = build_model(config.model, scenario.input_shape, scenario.num_classes, config.hidden_widths, config.seed)
    if not isinstance(model, MLP) or set(weights) != {n for n, _ in model.named_parameters()}:
        return None
    layers = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    params = {n: _stack(weights[n], len(jobs), n.endswith(".weight"), device) for n in weights}
    stats = _train(layers, params, plans, config, device)
    outcomes = []
    for k, ((_, _, state), plan) in enumerate(zip(jobs, plans)):
        client_weights = {n: _unstack(n, p[k]) for n, p in params.items()}
        outcomes.append(finish_round(config, plan, stats[k], state, client_weights, {}))
    return outcomes


def _stack(tensor: torch.Tensor, copies: int, is_weight: bool, device: torch.device) -> torch.Tensor:
    """``copies`` copies of one parameter along a new leading axis. A Linear weight is
    stored transposed, [K, in, out], so that every product of the forward and backward
    pass reads contiguous memory (with [K, out, in] the backward pass ran 2.5x slower)."""
    stacked = tensor.to(device).unsqueeze(0).expand(copies, *tensor.shape)
    if is_weight:
        stacked = stacked.transpose(1, 2)
    else:
        stacked = stacked.unsqueeze(1)  # a bias [K, 1, out] broadcasts over the batch
    return stacked.contiguous().requires_grad_(True)


def _unstack(name: str, stacked: torch.Tensor) -> torch.Tensor:
    """One client's parameter back in the model's own layout."""
    tensor = stacked.detach()
    tensor = tensor.t() if name.endswith(".weight") else tensor.squeeze(0)
    return tensor.cpu().contiguous()


def _forward(layers: list[str], params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP on K clients at once: x [K, B, ...] -> logits [K, B, classes]."""
    h = x.flatten(2)
    for i, name in enumerate(layers):
        h = torch.baddbmm(params[f"{name}.bias"], h, params[f"{name}.weight"])
        if i < len(layers) - 1:
            h = F.relu(h)
    return h


def _train(layers, params, plans: list[RoundPlan], config: RunConfig, device: torch.device) -> list[TrainStats]:
    """SGD on every client at once; updates ``params`` in place."""
    n = len(plans[0].data)
    lr = plans[0].lr
    xs = torch.stack([plan.data.x for plan in plans]).to(device)  # [K, n, ...]
    ys = torch.stack([plan.data.y for plan in plans]).to(device)
    rows = torch.arange(len(plans), device=device).unsqueeze(1)
    errors: list[list[torch.Tensor]] = [[] for _ in plans]
    losses = torch.zeros(len(plans), device=device)
    steps = 0
    for epoch in range(config.local_epochs):
        orders = torch.stack([torch.randperm(n, generator=plan.generator) for plan in plans]).to(device)
        for start in range(0, n, config.batch_size):
            idx = orders[:, start : start + config.batch_size]
            x, y = xs[rows, idx], ys[rows, idx]
            logits = _forward(layers, params, x)
            per_client = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
            per_client.sum().backward()  # client k's loss only depends on client k's weights
            with torch.no_grad():
                for p in params.values():
                    p.add_(p.grad, alpha=-lr)
                    p.grad = None
                losses += per_client.detach()
                if epoch == 0:
                    wrong = (logits.argmax(-1) != y).to(torch.uint8).cpu()
                    for k in range(len(plans)):
                        errors[k].append(wrong[k])
            steps += 1
    stats = []
    for k in range(len(plans)):
        bits = torch.cat(errors[k]) if errors[k] else torch.zeros(0, dtype=torch.uint8)
        stats.append(TrainStats(
            num_examples=n,
            loss=float(losses[k]) / max(steps, 1),
            prequential_accuracy=1.0 - float(bits.float().mean()) if len(bits) else 0.0,
            errors=bits,
        ))
    return stats
