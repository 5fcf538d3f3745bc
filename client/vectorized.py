"""Train a round's clients as one batched computation, continual-learning methods included.

A round's clients train the same model from the same global weights, each on its own data
with its own methods. Here their weights are stacked along a new leading axis
(``client.batched_models``) and they step in lockstep: at each step every client still
training contributes its next batch, and one batched forward and backward pass computes all
their gradients. What is per client stays per client and runs as on the one-client path: the
shuffles (each client's own generator, used by nothing else), the methods' hooks on the
received model (``start_task``, ``start_data``, ``start_round``, in that order), then step by
step ``extend_batch`` (each replay memory draws with its own generator) and ``observe``, the
drift check and the state.
The methods' loss terms come as data (``client.methods.terms``) and are computed for all
clients at once (``client.batched_loss``). So the outcome equals the clients' separate
``train_round`` calls up to float rounding (tests/test_vectorized_methods.py).

Clients may hold different numbers of samples: those with more steps come first, so the
clients still training at any step are a prefix of the stack, and their weights a view of
it; batches of unequal length are padded, the padding weighing nothing. When a batch has no
term but those on the logits alone (ER-ACE, DER) and the model is an MLP, the step is
``fused_sgd_step`` (the backward pass written out and fused with the update); otherwise
autograd computes it.

Not batched (the one-client path trains them): DP-SGD (per-sample clipping), a method that
acts on every optimizer step (SI) or is not declared ``vectorized``, Adam, frozen layers,
extra epochs in reaction to drift, local-only training, and a model that is not a chain of
Linear/Conv2d/ReLU/MaxPool2d/Flatten layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from client import batched_models
from client.batched_loss import LogitTerms, RoundTerms, client_losses
from client.drift_signals import gather_evidence_many
from client.learner import TrainStats
from client.methods import Method
from client.methods.terms import Term
from client.rounds import (
    RoundPlan, TrainOutcome, check_drift, finish_round, methods_state, plan_round, round_methods, start_stream,
)
from common.config import ClientSettings
from common.devices import resolve_device
from common.models import build_model
from common.scenarios import build_scenario


def can_vectorize(config: ClientSettings) -> bool:
    """Whether the settings allow a batched round: every method ``vectorized``, plain SGD,
    no frozen layers, no in-round reaction to drift (it would train only some clients
    further), federated training, no DP-SGD (each client clips per sample)."""
    return (
        config.methods.vectorized
        and config.drift.react_extra_epochs == 0
        and config.learner.optimizer == "sgd"
        and not config.network.frozen_prefixes
        and config.data.training != "local-only"
        and config.privacy.dp != "sample"
    )


@dataclass
class _Client:
    """One client's round on the batched path."""

    plan: RoundPlan
    methods: list[Method]
    state: dict[str, torch.Tensor]
    observe: bool
    orders: list[torch.Tensor]  # the sample order of each epoch
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * len(self.orders)


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
    scenario = build_scenario(config.data, config.seed)
    device = resolve_device(config.learner.device)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths,
                        config.seed)
    layers = batched_models.batched_layers(model)
    if layers is None or set(weights) != {n for n, _ in model.named_parameters()}:
        return None
    model.load_state_dict(weights)
    model.to(device)
    batch_size, epochs = config.learner.batch_size, config.learner.local_epochs
    clients: list[_Client] = []
    for partition, server_round, state in jobs:
        plan = plan_round(config, partition, server_round, state)
        methods = round_methods(config, scenario, partition, plan, state, model, device)
        orders = [torch.randperm(len(plan.data), generator=plan.generator) for _ in range(epochs)]
        clients.append(_Client(plan, methods, state, plan.task_changed, orders, -(-len(plan.data) // batch_size)))
    evidence: list = [None] * len(clients)
    if config.drift.drift_detector != "none":  # the received model on each client's new data, before training
        evidence = gather_evidence_many(model, [c.plan.data for c in clients], device)
    early = [start_stream(model, c.plan, c.methods, config, c.state, e) for c, e in zip(clients, evidence)]
    for client in clients:
        for method in client.methods:
            method.start_round(model)
    stats = _train(clients, layers, {n: p.detach() for n, p in model.named_parameters()}, config, device)
    outcomes = []
    for client, stat, seen, found in zip(clients, stats, evidence, early):
        client_weights, train_stats = stat
        drift = found if found is not None else check_drift(config.drift, client.state, train_stats.errors, seen)
        outcomes.append(finish_round(config, client.plan, train_stats, client.state, client_weights,
                                     methods_state(client.methods), drift))
    return outcomes


def _train(
    clients: list[_Client], layers, weights: dict[str, torch.Tensor], config: ClientSettings, device: torch.device,
) -> list[tuple[dict[str, torch.Tensor], TrainStats]]:
    """Every client's local training in lockstep; their weights and stats, in ``clients``' order."""
    order = sorted(range(len(clients)), key=lambda k: -clients[k].steps)  # training clients: always a prefix
    ranked = [clients[k] for k in order]
    linear = batched_models.linear_names(layers)
    names = list(weights)
    params = {n: batched_models.stack(n, [weights[n].to(device)] * len(ranked), linear) for n in names}
    terms = RoundTerms([[m.round_terms() for m in c.methods] for c in ranked], params, linear)
    lrs = torch.tensor([c.plan.lr for c in ranked], device=device)
    one_lr = len(set(lrs.tolist())) == 1
    fused = batched_models.fusable(layers) and terms.empty() and one_lr  # batch terms: on the logits alone
    classes = layers[-1][1].out_features
    weight_names = [f"{name}.weight" for name, _ in layers if name in linear]
    bias_names = [f"{name}.bias" for name, _ in layers if name in linear]
    batch_size = config.learner.batch_size
    errors: list[list[torch.Tensor]] = [[] for _ in ranked]
    losses = torch.zeros(len(ranked), dtype=torch.float64, device=device)
    steps = ranked[0].steps if ranked else 0
    stacked = _stacked_data(ranked, device)
    for step in range(steps):
        active = sum(1 for c in ranked if c.steps > step)
        batch = _Batch.stacked(stacked, ranked, step, batch_size) if stacked is not None \
            else _Batch.gather(ranked[:active], step, batch_size, device)
        logit_terms = LogitTerms.of(batch.terms, batch.y, classes)
        if fused:
            logits, loss = batched_models.fused_sgd_step(
                [params[n][:active] for n in weight_names], [params[n][:active] for n in bias_names],
                batch.x.flatten(2), batch.y, batch.row_weight, float(lrs[0]), logit_terms)
        else:
            logits, loss = _autograd_step(layers, params, active, batch, terms, logit_terms, lrs, one_lr)
        losses[:active] += loss.detach().to(torch.float64)
        wrong = None
        for k, client in enumerate(ranked[:active]):
            epoch = step // client.steps_per_epoch
            if epoch == 0:
                if wrong is None:  # the new samples head each batch; their logits predate this step
                    wrong = (logits.argmax(dim=-1) != batch.y).to(torch.uint8).cpu()
                new_x, new_y = batch.new[k]
                errors[k].append(wrong[k, : len(new_y)])
                if client.observe:
                    for method in client.methods:
                        method.observe(new_x, new_y)
    losses = losses.cpu()
    by_rank = []
    for k, client in enumerate(ranked):
        wrong = torch.cat(errors[k]) if errors[k] else torch.zeros(0, dtype=torch.uint8)
        stats = TrainStats(
            num_examples=len(client.plan.data),
            loss=float(losses[k]) / max(client.steps, 1),
            prequential_accuracy=1.0 - float(wrong.float().mean()) if len(wrong) else 0.0,
            errors=wrong,
            epochs=len(client.orders),
        )
        by_rank.append(({n: batched_models.unstack(n, params[n][k], linear) for n in names}, stats))
    results: list = [None] * len(clients)
    for rank, k in enumerate(order):
        results[k] = by_rank[rank]
    return results


@dataclass
class _Batch:
    """One lockstep step's batches of the clients still training, padded to one length."""

    x: torch.Tensor  # [K, B, *input shape]
    y: torch.Tensor  # [K, B]
    row_weight: torch.Tensor  # [K, B]: 1 / the client's batch size, 0 on padding
    new: list[tuple[torch.Tensor, torch.Tensor]]  # each client's new samples (the head of its batch)
    terms: list[list[Term]]  # each client's batch terms

    @classmethod
    def stacked(cls, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], clients: list[_Client], step: int,
                batch_size: int) -> "_Batch":
        """The batches of clients without methods and with equal data, all training, from
        ``_stacked_data``'s stack in one indexing operation."""
        xs, ys, rows = data
        epoch, at = divmod(step, clients[0].steps_per_epoch)
        idx = torch.stack([c.orders[epoch][at * batch_size : (at + 1) * batch_size] for c in clients]).to(xs.device)
        x, y = xs[rows, idx], ys[rows, idx]
        return cls(x, y, torch.full(y.shape, 1.0 / y.shape[1], device=xs.device), list(zip(x, y)),
                   [[] for _ in clients])

    @classmethod
    def gather(cls, clients: list[_Client], step: int, batch_size: int, device: torch.device) -> "_Batch":
        xs, ys, new, terms = [], [], [], []
        for client in clients:
            epoch, at = divmod(step, client.steps_per_epoch)
            idx = client.orders[epoch][at * batch_size : (at + 1) * batch_size]
            data = client.plan.data
            x, y = data.x[idx].to(device), data.y[idx].to(device)
            xb, yb = x, y
            for method in client.methods:
                xb, yb = method.extend_batch(xb, yb)
            xs.append(xb)
            ys.append(yb)
            new.append((x, y))
            terms.append([t for method in client.methods for t in method.batch_terms(len(yb), len(y))])
        sizes = [len(y) for y in ys]
        width = max(sizes)
        if all(size == width for size in sizes):
            x, y = torch.stack(xs), torch.stack(ys)
        else:
            x = xs[0].new_zeros((len(xs), width, *xs[0].shape[1:]))
            y = ys[0].new_zeros((len(ys), width))
            for k, (xb, yb) in enumerate(zip(xs, ys)):
                x[k, : len(yb)] = xb
                y[k, : len(yb)] = yb
        if all(size == width for size in sizes):
            row_weight = torch.full((len(sizes), width), 1.0 / width, device=device)
        else:
            counts = torch.tensor(sizes, device=device).unsqueeze(1)
            row_weight = ((torch.arange(width, device=device) < counts) / counts).float()
        return cls(x, y, row_weight, new, terms)


_last_stack: dict = {}  # the previous round's stack: "sources" (data tensors, kept alive), "key", "xs", "ys"


def _stacked_data(clients: list[_Client], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """When no client has a method and all hold the same number of samples (plain SGD on an
    even split), their samples as xs [K, n, ...], ys [K, n] and the row index [K, 1]; else
    None. A round whose clients hold the same data tensors as the previous round's (one task,
    all clients sampled) reuses the previous stack instead of copying it again (the ids are
    safe to compare: the previous tensors are kept alive, so no id can have been reused)."""
    if any(c.methods for c in clients) or len({len(c.plan.data) for c in clients}) != 1 or not len(clients[0].plan.data):
        return None
    sources = [t for c in clients for t in (c.plan.data.x, c.plan.data.y)]
    key = (tuple(id(t) for t in sources), device)
    if _last_stack.get("key") != key:
        _last_stack.clear()  # the old stack goes before the new one is made
        xs = torch.stack([c.plan.data.x for c in clients]).to(device)
        ys = torch.stack([c.plan.data.y for c in clients]).to(device)
        _last_stack.update(sources=sources, key=key, xs=xs, ys=ys)
    rows = torch.arange(len(clients), device=device).unsqueeze(1)
    return _last_stack["xs"], _last_stack["ys"], rows


def _autograd_step(layers, params: dict[str, torch.Tensor], active: int, batch: _Batch, terms: RoundTerms,
                   logit_terms: LogitTerms, lrs: torch.Tensor, one_lr: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of the first ``active`` clients with autograd; updates ``params`` in place."""
    views = {n: p[:active].detach().requires_grad_() for n, p in params.items()}

    def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return batched_models.forward(layers, p, x)

    logits = forward(views, batch.x)
    loss = client_losses(logits, batch.y, batch.row_weight, batch.x, views, terms, logit_terms, forward)
    grads = torch.autograd.grad(loss.sum(), list(views.values()))
    with torch.no_grad():
        for (name, param), grad in zip(params.items(), grads):
            if one_lr:
                param[:active].sub_(grad, alpha=float(lrs[0]))
            else:
                param[:active].sub_(grad * lrs[:active].view(-1, *[1] * (grad.dim() - 1)))
    return logits.detach(), loss.detach()
