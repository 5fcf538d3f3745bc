"""The loss of K clients' batches at once: the cross-entropy and the methods' terms
(``client.methods.terms``), each client's exactly as ``client.learner.batch_loss`` computes
it on its own model (up to float rounding).

Batches are padded to one length: ``row_weight`` [K, B] is 1 / the client's batch size on its
samples and 0 on the padding, so that a padded row adds nothing to a loss or a gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from client.batched_models import stack
from client.methods.terms import Distill, MatchLogits, OwnClassesOnly, Pull, Term


class RoundTerms:
    """The terms that stay fixed for a round (``Method.round_terms``), stacked across the
    round's clients in the order given; a client without a term gets a zero coefficient or
    weight for it. Terms are matched across clients by their position in the method list."""

    def __init__(self, per_client: list[list[list[Term]]], params: dict[str, torch.Tensor], linear: set[str]) -> None:
        self.pulls: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.distills: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]] = []
        slots = max((len(terms) for terms in per_client), default=0)
        for slot in range(slots):
            at = [terms[slot] if slot < len(terms) else [] for terms in per_client]
            for kind in (Pull, Distill):
                found = [next((t for t in terms if isinstance(t, kind)), None) for terms in at]
                if not any(found):
                    continue
                if kind is Pull:
                    self.pulls.append(_stack_pulls(found, params, linear))  # type: ignore[arg-type]
                else:
                    self.distills.append(_stack_distills(found, params, linear))  # type: ignore[arg-type]

    def empty(self) -> bool:
        return not self.pulls and not self.distills


def _stack_pulls(pulls: list[Pull | None], params: dict[str, torch.Tensor], linear: set[str]):
    coefficients, anchors = {}, {}
    for name, stacked in params.items():
        shape, device = stacked.shape[1:], stacked.device
        own = [_own_shape(p, name, shape, linear) for p in pulls]
        if not any(own):
            continue
        scalar = all(p is None or not isinstance(p.coefficient[name], torch.Tensor) for p, ok in zip(pulls, own) if ok)
        if scalar:  # one number per client (FedProx): broadcast, never a tensor of the parameter's size
            values = [float(p.coefficient[name]) if ok and p is not None else 0.0 for p, ok in zip(pulls, own)]
            coefficients[name] = torch.tensor(values, device=device).view(-1, *[1] * len(shape))
        else:
            coefficients[name] = torch.stack([
                _as_tensor(p.coefficient[name], name, shape, linear, device) if ok and p is not None
                else torch.zeros(shape, device=device) for p, ok in zip(pulls, own)
            ])
        anchors[name] = torch.stack([
            _as_tensor(p.anchor[name], name, shape, linear, device) if ok and p is not None
            else torch.zeros(shape, device=device) for p, ok in zip(pulls, own)
        ])
    return coefficients, anchors


def _own_shape(pull: Pull | None, name: str, shape: torch.Size, linear: set[str]) -> bool:
    """Whether ``pull`` pulls parameter ``name`` with values of the model's shape (a state of
    other settings is skipped, as the one-client penalties of EWC, SI and MAS skip it)."""
    if pull is None or name not in pull.coefficient or name not in pull.anchor:
        return False
    model_shape = _model_shape(name, shape, linear)
    coefficient = pull.coefficient[name]
    return pull.anchor[name].shape == model_shape and (
        not isinstance(coefficient, torch.Tensor) or coefficient.shape == model_shape)


def _model_shape(name: str, shape: torch.Size, linear: set[str]) -> torch.Size:
    layer, kind = name.rsplit(".", 1)
    if layer in linear:
        return torch.Size((shape[1], shape[0])) if kind == "weight" else torch.Size(shape[1:])
    return shape


def _as_tensor(value: torch.Tensor | float, name: str, shape: torch.Size, linear: set[str], device) -> torch.Tensor:
    """A value in the model's layout, as one client's slice of the stacked layout."""
    tensor = value if isinstance(value, torch.Tensor) else torch.full(_model_shape(name, shape, linear), float(value))
    return stack(name, [tensor.to(device).float()], linear)[0]


def _stack_distills(distills: list[Distill | None], params: dict[str, torch.Tensor], linear: set[str]):
    device = next(iter(params.values())).device
    teacher = {
        name: torch.stack([
            stack(name, [d.teacher[name].to(device).float()], linear)[0] if d is not None else torch.zeros_like(p[0])
            for d in distills
        ]) for name, p in params.items()
    }
    weight = torch.tensor([d.weight if d is not None else 0.0 for d in distills], device=device)
    temperature = torch.tensor([d.temperature if d is not None else 1.0 for d in distills], device=device)
    return teacher, weight, temperature


@dataclass(frozen=True)
class LogitTerms:
    """The batch terms that act on the logits alone, as tensors for all K clients: ER-ACE's
    ``hidden`` classes [K, B, classes] (True: masked out of that row's cross-entropy) and DER's
    matched logits, ``scale`` [K, B] (weight / (rows x classes) on a matched row, else 0) and
    ``target`` [K, B, classes]; None where no client has the term. Both the autograd step and
    the fused step read them."""

    hidden: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    target: torch.Tensor | None = None

    @classmethod
    def of(cls, batch_terms: list[list[Term]], y: torch.Tensor, classes: int) -> "LogitTerms":
        return cls(_hidden_classes(batch_terms, y, classes), *_matches(batch_terms, y, classes))

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the cross-entropy reads."""
        return logits if self.hidden is None else logits.masked_fill(self.hidden, torch.finfo(logits.dtype).min)

    def difference(self, logits: torch.Tensor) -> torch.Tensor | None:
        """logits - target on matched rows, 0 elsewhere (an overflowing logit there adds no NaN)."""
        if self.scale is None or self.target is None:
            return None
        return (logits - self.target).masked_fill((self.scale == 0).unsqueeze(-1), 0.0)


def client_losses(
    logits: torch.Tensor,
    y: torch.Tensor,
    row_weight: torch.Tensor,
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    round_terms: RoundTerms,
    logit_terms: LogitTerms,
    forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Each of the first K clients' loss [K]: logits [K, B, classes] of their batches x with
    labels y; ``params`` their weights (the first K of the round's), ``round_terms`` the
    round's, ``logit_terms`` this batch's; ``forward`` the batched model (for LwF's teachers)."""
    clients = logits.shape[0]
    log_p = torch.log_softmax(logit_terms.masked(logits), dim=-1)
    loss = -(log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1) * row_weight).sum(1)
    for coefficients, anchors in round_terms.pulls:
        for name, coefficient in coefficients.items():
            pulled = coefficient[:clients] * (params[name] - anchors[name][:clients]) ** 2
            loss = loss + pulled.flatten(1).sum(1)
    for teacher, weight, temperature in round_terms.distills:
        active = {n: t[:clients] for n, t in teacher.items()}
        t = temperature[:clients].view(-1, 1, 1)
        with torch.no_grad():
            target = torch.softmax(forward(active, x) / t, dim=-1)
        log_student = torch.log_softmax(logits / t, dim=-1)
        kl = (torch.xlogy(target, target) - target * log_student).sum(-1)
        loss = loss + weight[:clients] * temperature[:clients] ** 2 * (kl * row_weight).sum(1)
    difference = logit_terms.difference(logits)
    if difference is not None:
        loss = loss + (logit_terms.scale.unsqueeze(-1) * difference**2).sum((1, 2))
    return loss


def _hidden_classes(batch_terms: list[list[Term]], y: torch.Tensor, classes: int) -> torch.Tensor | None:
    """For each client under ER-ACE, the classes absent from its new samples, in its new
    samples' rows."""
    num_new = [next((t.num_new for t in terms if isinstance(t, OwnClassesOnly)), -1) for terms in batch_terms]
    if all(n < 0 for n in num_new):
        return None
    rows = torch.arange(y.shape[1], device=y.device)
    new = rows < torch.tensor(num_new, device=y.device).unsqueeze(1)  # clients without the term: no row
    counts = torch.zeros(y.shape[0], classes, dtype=torch.int32, device=y.device)
    present = counts.scatter_add_(1, y, new.to(torch.int32)) > 0  # the classes among each client's new samples
    return new.unsqueeze(-1) & ~present.unsqueeze(1)


def _matches(batch_terms: list[list[Term]], y: torch.Tensor, classes: int):
    """DER's matched rows: (scale, target), or (None, None) when no client has one."""
    matches = [[t for t in terms if isinstance(t, MatchLogits)] for terms in batch_terms]
    if not any(matches):
        return None, None
    target = torch.zeros(*y.shape, classes, device=y.device)
    scale = torch.zeros(y.shape, device=y.device)
    for k, found in enumerate(matches):
        for term in found:
            target[k, term.rows] = term.targets.to(y.device, torch.float32)
            scale[k, term.rows] += term.weight / (len(term.rows) * classes)
    return scale, target
