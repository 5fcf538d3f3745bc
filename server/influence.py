"""How far one reply may move the global model: bounded relative to the round's median.

A client decides two things the server cannot check: how many samples it claims
(``num-examples``) and how far its weights are from the global model. Left alone, one client
claiming a million samples and sending a replacement model becomes the new global model. So,
before any aggregation rule and by default:

- **weight cap**: a reply's claim counts at most ``weight_cap`` times the round's median claim;
- **outliers**: a reply whose update (its weights minus the global model) is more than
  ``norm_outlier`` times the round's median update norm is dropped, with its reason: a
  boosted model-replacement update is not cut to size but left out (rounds of 3 replies or
  more; with fewer the median is not a majority's). A run whose drift reactions train a
  drifting client harder (``DriftSettings.enlarges_updates``) makes such updates honest, so
  there the rule is off and only the caps apply;
- **norm cap**: the other replies' updates are cut to at most ``norm_cap`` times the round's
  median update norm, keeping their direction.

With both caps at 2 the aggregate of a weighted mean moves at most twice the round's median
update norm, whatever one client claims or sends; a lying minority can still pull the model
by up to its capped share each round. Both caps read the round's median, so they hold while
fewer than half of a round's accepted replies are hostile. A round with one reply is its
own median: nothing is capped. Honest clients are capped too when their data sizes or
update norms differ by more than the caps (e.g. very non-IID partitions): raise the caps, or
set them to 0 (off) for FedAvg's plain weighted mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from server.robust import update_norm

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class InfluenceBound:
    """The caps and the outlier ratio (0: off), and what they do to a round."""

    weight_cap: float = 2.0
    norm_cap: float = 2.0
    norm_outlier: float = 5.0

    @property
    def reads_norms(self) -> bool:
        return bool(self.norm_cap or self.norm_outlier)

    def cap_weights(self, weights: list[float]) -> tuple[list[float], int]:
        """Each weight cut to ``weight_cap`` times the median weight; and how many were cut."""
        if not self.weight_cap or len(weights) < 2:
            return list(weights), 0
        limit = self.weight_cap * float(np.median(weights))
        return [min(w, limit) for w in weights], sum(1 for w in weights if w > limit)

    def outliers(self, norms: list[float]) -> dict[int, str]:
        """The replies (by index) whose update norm is more than ``norm_outlier`` times the
        median of ``norms``, with the reason to drop each."""
        if not self.norm_outlier or len(norms) < 3:
            return {}
        median = float(np.median(norms))
        return {
            i: f"update norm {norm:.4g} is {norm / median:.1f}x the round's median {median:.4g} (over "
               f"--norm-outlier {self.norm_outlier:g})" if median > 0 else
               f"update norm {norm:.4g} while the round's median is 0 (--norm-outlier)"
            for i, norm in enumerate(norms) if norm > self.norm_outlier * median
        }

    def cap_updates(self, replies: list[Arrays], reference: Arrays,
                    norms: list[float] | None = None) -> tuple[list[Arrays], int]:
        """Each reply moved toward ``reference`` so that its update norm is at most
        ``norm_cap`` times the median update norm; and how many were cut. ``norms``: the
        replies' update norms, when known."""
        if not self.norm_cap or len(replies) < 2:
            return list(replies), 0
        norms = norms if norms is not None else [update_norm(reply, reference) for reply in replies]
        limit = self.norm_cap * float(np.median(norms))
        out, cut = [], 0
        for reply, norm in zip(replies, norms):
            if norm <= limit:
                out.append(reply)
                continue
            cut += 1
            scale = limit / norm if math.isfinite(norm) else 0.0
            out.append({name: _toward(reply[name], ref, scale) for name, ref in reference.items()})
        return out, cut


def _toward(value: np.ndarray, ref: np.ndarray, scale: float) -> np.ndarray:
    if not np.issubdtype(ref.dtype, np.floating):
        return value
    moved = ref.astype(np.float64) + scale * (value.astype(np.float64) - ref.astype(np.float64))
    return moved.astype(ref.dtype)
