"""Train many clients' rounds as one vectorised computation.

When every client of a round runs plain SGD with no method hooks, their local training is
the same program on different data: stacking their weights along a new leading axis turns
K small matrix products into one batched product (``baddbmm``), forward and backward
(``_sgd_step`` writes the backward pass out, fused with the SGD update). This covers the MLP;
other models take the one-client-at-a-time path. Each client still shuffles with its own
generator, sees its own samples in its own order, and gets its own prequential errors, so
the result equals K separate ``train_local`` calls up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from client.learner import TrainStats
from client.drift_signals import gather_evidence_many
from client.rounds import RoundPlan, TrainOutcome, check_drift, finish_round, plan_round
from common.config import ClientSettings
from common.devices import resolve_device
from common.models import MLP, build_model
from common.scenarios import build_scenario


def can_vectorize(config: ClientSettings) -> bool:
    """Plain SGD with no per-client hooks: no method that is not ``vectorized`` (none of the
    built-ins is yet; the proximal term is one of them), no frozen layers,
    and no in-round reaction to drift (it would train only some clients further)."""
    return (
        config.methods.vectorized
        and config.drift.react_extra_epochs == 0
        and config.learner.optimizer == "sgd"
        and not config.network.frozen_prefixes
        and config.data.training != "local-only"
        and config.privacy.dp != "sample"  # DP-SGD trains each client with its own per-sample clipping
    )


def train_rounds_together(
    config: ClientSettings,
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
    scenario = build_scenario(config.data, config.seed)
    device = resolve_device(config.learner.device)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths, config.seed)
    if not isinstance(model, MLP) or set(weights) != {n for n, _ in model.named_parameters()}:
        return None
    layers = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    evidence: list = [None] * len(plans)
    if config.drift.drift_detector != "none":  # the received model on each client's new data, before training
        model.load_state_dict(weights)
        model.to(device)
        evidence = gather_evidence_many(model, [plan.data for plan in plans], device)
    params = {n: _stack(weights[n], len(jobs), n.endswith(".weight"), device) for n in weights}
    stats = _train(layers, params, plans, config, device)
    outcomes = []
    for k, ((_, _, state), plan) in enumerate(zip(jobs, plans)):
        client_weights = {n: _unstack(n, p[k]) for n, p in params.items()}
        drift = check_drift(config.drift, state, stats[k].errors, evidence[k])
        outcomes.append(finish_round(config, plan, stats[k], state, client_weights, {}, drift))
    return outcomes


def _stack(tensor: torch.Tensor, copies: int, is_weight: bool, device: torch.device) -> torch.Tensor:
    """``copies`` copies of one parameter along a new leading axis. A Linear weight is
    stored transposed, [K, in, out], so that every product of the forward and backward
    pass reads contiguous memory; a bias as [K, 1, out], to broadcast over the batch."""
    stacked = tensor.to(device).unsqueeze(0).expand(copies, *tensor.shape)
    stacked = stacked.transpose(1, 2) if is_weight else stacked.unsqueeze(1)
    return stacked.clone(memory_format=torch.contiguous_format)  # never a view of the caller's tensor


def _unstack(name: str, stacked: torch.Tensor) -> torch.Tensor:
    """One client's parameter back in the model's own layout."""
    tensor = stacked.t() if name.endswith(".weight") else stacked.squeeze(0)
    return tensor.cpu().contiguous()


def _sgd_step(
    weights: list[torch.Tensor], biases: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of K MLPs (Linear + ReLU layers, cross-entropy loss) on their own
    batches x [K, B, features], y [K, B]; returns (logits, per-client mean loss).

    The backward pass is written out, because it can update each weight in the same
    product that computes its gradient: ``W.baddbmm_(a^T, g, alpha=-lr)`` reads and writes
    W once, where autograd writes a gradient, reads it back and then updates W (the step
    is ~25% faster). The maths is that of autograd: for logits z = a W + b,
    dL/dz = (softmax(z) - onehot(y)) / B; dL/dW = a^T dL/dz; dL/db = sum_B dL/dz;
    dL/da = dL/dz W^T, masked where the ReLU was off."""
    inputs = [x]
    h = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = torch.baddbmm(b, h, w)
        if i < len(weights) - 1:
            h.clamp_(min=0)
            inputs.append(h)
    logits = h
    log_p = torch.log_softmax(logits, dim=-1)
    loss = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
    grad = log_p.exp_()
    grad.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(grad[..., :1], -1.0))
    grad.div_(y.shape[1])
    for i in reversed(range(len(weights))):
        a = inputs[i]
        below = torch.bmm(grad, weights[i].transpose(1, 2)).mul_(a > 0) if i > 0 else None  # with W before its step
        weights[i].baddbmm_(a.transpose(1, 2), grad, alpha=-lr)
        biases[i].sub_(grad.sum(1, keepdim=True), alpha=lr)
        grad = below
    return logits, loss


_last_stack: dict = {}  # the previous round's stack: "sources" (data tensors, kept alive), "key", "xs", "ys"


def _stacked_data(plans: list[RoundPlan], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The clients' samples as xs [K, n, features] and ys [K, n]. When a round's clients
    hold the same data tensors as the previous round's (one task, all clients sampled), the
    previous stack is reused instead of copied again (the ids are safe to compare: the
    previous tensors are kept alive, so no id can have been reused)."""
    sources = [t for plan in plans for t in (plan.data.x, plan.data.y)]
    key = (tuple(id(t) for t in sources), device)
    if _last_stack.get("key") != key:
        xs = torch.stack([plan.data.x for plan in plans]).to(device).flatten(2)
        ys = torch.stack([plan.data.y for plan in plans]).to(device)
        _last_stack.update(sources=sources, key=key, xs=xs, ys=ys)
    return _last_stack["xs"], _last_stack["ys"]


def _train(layers, params, plans: list[RoundPlan], config: ClientSettings, device: torch.device) -> list[TrainStats]:
    """SGD on every client at once; updates ``params`` in place."""
    n = len(plans[0].data)
    lr = plans[0].lr
    weights = [params[f"{name}.weight"] for name in layers]
    biases = [params[f"{name}.bias"] for name in layers]
    xs, ys = _stacked_data(plans, device)
    rows = torch.arange(len(plans), device=device).unsqueeze(1)
    errors: list[torch.Tensor] = []
    losses = torch.zeros(len(plans), device=device)
    steps = 0
    with torch.no_grad():
        for epoch in range(config.learner.local_epochs):
            orders = torch.stack([torch.randperm(n, generator=plan.generator) for plan in plans]).to(device)
            for start in range(0, n, config.learner.batch_size):
                idx = orders[:, start : start + config.learner.batch_size]
                y = ys[rows, idx]
                logits, loss = _sgd_step(weights, biases, xs[rows, idx], y, lr)
                losses += loss
                if epoch == 0:
                    errors.append(logits.argmax(-1) != y)
                steps += 1
    wrong = torch.cat(errors, dim=1).to(torch.uint8).cpu() if errors else torch.zeros((len(plans), 0), dtype=torch.uint8)
    losses = losses.cpu()
    return [
        TrainStats(
            num_examples=n,
            loss=float(losses[k]) / max(steps, 1),
            prequential_accuracy=1.0 - float(wrong[k].float().mean()) if wrong.shape[1] else 0.0,
            errors=wrong[k].clone(),
            epochs=config.learner.local_epochs,
        )
        for k in range(len(plans))
    ]
