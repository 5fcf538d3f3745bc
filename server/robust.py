"""Robust aggregation rules: one global model from replies some of which may be hostile.

FedAvg's weighted mean follows any single reply as far as it likes: one client scaling its
update by 1000 moves the global model by ~1000/n. These rules bound that influence:

- ``median``: coordinate-wise median of the replies (Yin et al., 2018); unweighted.
- ``trimmed-mean``: per coordinate, cut the ``ceil(trim_fraction * n)`` largest and smallest
  values and average the rest (Yin et al., 2018); unweighted.
- ``multikrum``: score each reply by the summed squared distances to its ``n - F - 2``
  nearest others, keep the ``n - F`` best scored and take their weighted mean
  (Blanchard et al., 2017; El Mhamdi et al., 2018). Needs ``n > 2F + 2``.
- ``clip``: cut each update (reply - global) to L2 norm ``clip_norm``, then the weighted
  mean (as in DP-FedAvg / norm bounding, Sun et al., 2019).

Rules work on plain numpy arrays (no Flower types): each reply is a ``{name: array}`` dict
with the global model's names, shapes and dtypes (validation guarantees that), finite.
Computation is in float64; the result keeps each array's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.config import trimmed_count
from common.sections import ServerSettings

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class AggregationRule:
    """Which rule aggregates a round, with its parameters (see the module docstring)."""

    name: str = "fedavg"
    trim_fraction: float = 0.1
    tolerated_attackers: int = 1
    clip_norm: float = 0.0

    @classmethod
    def from_settings(cls, server: ServerSettings) -> "AggregationRule":
        return cls(server.aggregation, server.trim_fraction, server.tolerated_attackers, server.clip_norm)

    def precondition(self, replies: int) -> str | None:
        """Why ``replies`` valid replies are too few for this rule, or None when they suffice."""
        if replies < 1:
            return f"{self.name} needs at least 1 valid reply, got 0"
        if self.name == "multikrum" and replies <= 2 * self.tolerated_attackers + 2:
            return (
                f"multikrum with {self.tolerated_attackers} tolerated attacker(s) needs more than "
                f"{2 * self.tolerated_attackers + 2} valid replies, got {replies}"
            )
        if self.name == "trimmed-mean":
            cut = trimmed_count(replies, self.trim_fraction)
            if replies - 2 * cut < 1:
                return f"trimmed-mean cuts {cut} of {replies} valid replies from each side and would keep none"
        return None

    @property
    def weighs_replies(self) -> bool:
        """Whether every reply enters the aggregate with its weight (median and trimmed mean
        ignore weights; multikrum weighs only the replies it selects)."""
        return self.name in ("fedavg", "clip")

    def aggregate(self, replies: list[Arrays], weights: list[float], reference: Arrays) -> Arrays:
        """The new global arrays from ``replies`` (weighted by ``weights``, e.g. num-examples,
        where the rule is weighted). ``reference`` is the current global model (for ``clip``).
        Raises ValueError when ``precondition`` does not hold."""
        reason = self.precondition(len(replies))
        if reason:
            raise ValueError(reason)
        w = np.asarray(weights, dtype=np.float64)
        if self.name == "fedavg":
            return weighted_average(replies, w, reference)
        names = list(reference)
        stack = np.stack([_flatten(r, names) for r in replies])  # [n, d] float64
        if self.name == "median":
            flat = np.median(stack, axis=0)
        elif self.name == "trimmed-mean":
            flat = trimmed_mean(stack, trimmed_count(len(replies), self.trim_fraction))
        elif self.name == "multikrum":
            keep = multikrum_select(stack, self.tolerated_attackers)
            flat = weighted_mean(stack[keep], w[keep])
        elif self.name == "clip":
            center = _flatten(reference, names)
            flat = weighted_mean(clip_updates(stack, center, self.clip_norm), w)
        else:
            raise ValueError(f"unknown aggregation rule '{self.name}'")
        return _unflatten(flat, reference)


def weighted_mean(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Rows of ``stack`` [n, d] averaged with ``weights`` [n] (normalized first, so that
    huge weights cannot overflow)."""
    factors = weights / weights.sum()
    return factors @ stack


def weighted_average(replies: list[Arrays], weights: np.ndarray, reference: Arrays) -> Arrays:
    """FedAvg: per array, the mean of the replies weighted by ``weights``, summed in float64
    one reply at a time (no [n, d] float64 stack of all replies)."""
    factors = weights / weights.sum()
    out = {}
    for name, ref in reference.items():
        total = np.zeros(ref.shape, dtype=np.float64)
        for factor, reply in zip(factors, replies):
            total += factor * reply[name]
        out[name] = (total if np.issubdtype(ref.dtype, np.floating) else np.round(total)).astype(ref.dtype)
    return out


def trimmed_mean(stack: np.ndarray, cut: int) -> np.ndarray:
    """Per column, the mean of the values left after cutting the ``cut`` smallest and largest."""
    ordered = np.sort(stack, axis=0)
    return ordered[cut : stack.shape[0] - cut].mean(axis=0)


def multikrum_select(stack: np.ndarray, tolerated: int) -> np.ndarray:
    """Indices of the ``n - F`` rows with the lowest Krum scores (ties: the lower index)."""
    n = stack.shape[0]
    squares = np.einsum("ij,ij->i", stack, stack)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2 * stack @ stack.T, 0.0)
    neighbours = n - tolerated - 2
    scores = np.array([np.sort(np.delete(distances[i], i))[:neighbours].sum() for i in range(n)])
    return np.sort(np.argsort(scores, kind="stable")[: n - tolerated])


def clip_updates(stack: np.ndarray, center: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each row moved toward ``center`` so that its distance to it is at most ``clip_norm``."""
    updates = stack - center
    norms = np.linalg.norm(updates, axis=1)
    scale = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-300))
    return center + updates * scale[:, None]


def update_norm(reply: Arrays, reference: Arrays) -> float:
    """L2 norm of ``reply - reference`` over all arrays together (float64; inf on overflow)."""
    total = 0.0
    for name, ref in reference.items():
        diff = reply[name].astype(np.float64) - ref.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total) if math.isfinite(total) else math.inf


def _flatten(arrays: Arrays, names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[n], dtype=np.float64).ravel() for n in names])


def _unflatten(flat: np.ndarray, reference: Arrays) -> Arrays:
    out, start = {}, 0
    for name, ref in reference.items():
        part = flat[start : start + ref.size].reshape(ref.shape)
        start += ref.size
        if not np.issubdtype(ref.dtype, np.floating):
            part = np.round(part)
        out[name] = part.astype(ref.dtype)
    return out
