"""What a client measures about a round's new data before training on it, and the round-level
drift tests that compare it with what it measured a round before.

The error-stream detectors (``client.drift``) read one error bit per sample as the model
learns, so they also fire when the *global model* changes under a client whose data did not
(other clients moved to a new task and the average forgot some of this one's). The round-level
tests read a ``RoundEvidence``: the received global model's accuracy and confidence on the
round's first ``EVIDENCE_SAMPLES`` new samples, before any training, and the inputs' mean.

- ``accuracy-drop`` (needs labels): drift when the accuracy fell by at least ``margin`` since
  the last round and the fall is significant (a one-sided two-proportion z test at ``Z``);
- ``accuracy-or-inputs``: either of ``accuracy-drop`` and ``input-shift``: the model fails on
  the new data (a concept changed: the same inputs mean other labels), or the inputs moved
  (new classes, a new domain), even where the model already knows them;
- ``confidence-drop`` (no labels): drift when the mean top softmax probability fell by at least
  ``margin``; it works where labels arrive late;
- ``input-shift`` (no labels, no model): drift when the inputs' mean moved by more than
  ``SHIFT_THRESHOLD`` times what sampling alone explains (a Hotelling-like ratio with the
  variances pooled over features), in rounds of at least ``MIN_SHIFT_SAMPLES`` samples.

The accuracy and confidence tests compare this round's evidence, under this round's model,
with last round's, under last round's model: a change of the global model alone moves them
too, but rarely by the margin and never significantly at once (measured by
``benchmarks/drift_detectors.py``).

Each round's evidence is kept as a few scalars and one mean vector (the state's ``drift.``
keys), so it lives on disk with the client's state; no sample is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from common.datasets import LabelledSplit
from common.sections import ROUND_DETECTORS

EVIDENCE_SAMPLES = 256
Z = 3.0  # one-sided, ~1 false alarm in 740 stationary rounds from sampling noise alone
SHIFT_THRESHOLD = 6.0  # input-shift ratio: about 1 when nothing changed (see benchmarks/drift_detectors.py)
MIN_SHIFT_SAMPLES = 32  # fewer samples than this in either round: their variance says too little
LABEL_FREE = ("confidence-drop", "input-shift")


@dataclass(frozen=True)
class RoundEvidence:
    """The received model on the round's new samples before training, and their inputs."""

    samples: int
    accuracy: float
    confidence: float
    input_mean: torch.Tensor  # float32 [features]
    input_var: float  # mean over features of the per-feature variance

    def as_state(self) -> dict[str, torch.Tensor]:
        return {
            "evidence": torch.tensor([self.samples, self.accuracy, self.confidence, self.input_var], dtype=torch.float64),
            "input-mean": self.input_mean.to(torch.float32),
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], features: int) -> "RoundEvidence | None":
        """The evidence ``as_state`` saved, or None when it is missing or does not fit (a state
        from another model or a damaged file: the next round then starts a fresh comparison)."""
        scalars, mean = state.get("evidence"), state.get("input-mean")
        if scalars is None or mean is None or scalars.shape != (4,) or mean.shape != (features,):
            return None
        if not (torch.isfinite(scalars).all() and torch.isfinite(mean).all()):
            return None
        samples, acc, conf, var = (float(v) for v in scalars)
        if samples < 1 or not (0 <= acc <= 1 and 0 <= conf <= 1) or var < 0:
            return None
        return cls(int(samples), acc, conf, mean.to(torch.float32), var)


def gather_evidence(model: nn.Module, data: LabelledSplit, device: torch.device) -> RoundEvidence | None:
    """The evidence of ``data``'s first ``EVIDENCE_SAMPLES`` samples (the stream's order), in
    one forward pass in eval mode; None when there is no sample."""
    return gather_evidence_many(model, [data], device)[0]


@torch.no_grad()
def gather_evidence_many(model: nn.Module, splits: list[LabelledSplit], device: torch.device) -> list[RoundEvidence | None]:
    """``gather_evidence`` for several clients' data under one model, in one forward pass."""
    counts = [min(len(data), EVIDENCE_SAMPLES) for data in splits]
    if not any(counts):
        return [None] * len(splits)
    x = torch.cat([data.x[:count] for data, count in zip(splits, counts)]).to(device)
    y = torch.cat([data.y[:count] for data, count in zip(splits, counts)]).to(device)
    was_training = model.training
    model.eval()
    try:
        top, predicted = torch.softmax(model(x).float(), dim=1).max(dim=1)
    finally:
        model.train(was_training)
    out: list[RoundEvidence | None] = []
    start = 0
    for count in counts:
        if count == 0:
            out.append(None)
            continue
        part = slice(start, start + count)
        flat = x[part].reshape(count, -1).double()
        out.append(RoundEvidence(
            samples=count,
            accuracy=float((predicted[part] == y[part]).double().mean()),
            confidence=float(top[part].double().mean()),
            input_mean=flat.mean(dim=0).float().cpu(),
            input_var=float(flat.var(dim=0).mean()) if count > 1 else 0.0,
        ))
        start += count
    return out


def accuracy_fell(before: RoundEvidence, now: RoundEvidence, margin: float) -> bool:
    """Whether accuracy fell by at least ``margin`` and by more than ``Z`` standard errors."""
    fall = before.accuracy - now.accuracy
    if fall < margin:
        return False
    pooled = (before.accuracy * before.samples + now.accuracy * now.samples) / (before.samples + now.samples)
    error = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / before.samples + 1 / now.samples))
    return fall / error > Z


def confidence_fell(before: RoundEvidence, now: RoundEvidence, margin: float) -> bool:
    return before.confidence - now.confidence >= margin


def input_shift_ratio(before: RoundEvidence, now: RoundEvidence) -> float:
    """The squared distance between the two means over what sampling noise alone would give
    it (``features * variance * (1/n1 + 1/n2)``): about 1 for one distribution. 0 when
    either round has fewer than ``MIN_SHIFT_SAMPLES`` samples (a single sample has no
    variance, and every round would look like a shift)."""
    if min(before.samples, now.samples) < MIN_SHIFT_SAMPLES:
        return 0.0
    features = now.input_mean.numel()
    noise = features * max((before.input_var + now.input_var) / 2, 1e-12) * (1 / before.samples + 1 / now.samples)
    return float(((now.input_mean.double() - before.input_mean.double()) ** 2).sum()) / noise


def round_drift(detector: str, before: RoundEvidence | None, now: RoundEvidence | None, margin: float) -> bool:
    """The round-level test ``detector`` on this round's and last round's evidence."""
    if before is None or now is None:
        return False
    if detector == "accuracy-or-inputs":
        return accuracy_fell(before, now, margin) or input_shift_ratio(before, now) > SHIFT_THRESHOLD
    if detector == "accuracy-drop":
        return accuracy_fell(before, now, margin)
    if detector == "confidence-drop":
        return confidence_fell(before, now, margin)
    if detector == "input-shift":
        return input_shift_ratio(before, now) > SHIFT_THRESHOLD
    raise ValueError(f"'{detector}' is not a round-level drift test: use one of {', '.join(ROUND_DETECTORS)}")
