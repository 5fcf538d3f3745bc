"""The task boundary a client can observe without task ids.

A round's new samples end the task before them when they hold a label the client never had
(a new class), or when the client's drift detector found a drift at them (a new domain or
concept: same labels, other inputs or meanings). Methods that act at a boundary without the
scenario's task ids (replay filled at a boundary, SI, MAS, dgr) keep one of these.
"""

from __future__ import annotations

import torch

MAX_LABEL = 1_000_000  # a saved label set longer than this is not a client's
KEY = "labels-seen"


class TaskBoundary:
    def __init__(self) -> None:
        self.labels_seen = torch.zeros(0, dtype=torch.bool)

    def see(self, labels: torch.Tensor, drifted: bool) -> bool:
        """Whether these new samples start a new task; they are then counted as seen."""
        labels = labels.detach().cpu().long()
        top = int(labels.max()) + 1 if len(labels) else 0
        seen = torch.zeros(max(top, len(self.labels_seen)), dtype=torch.bool)
        seen[: len(self.labels_seen)] = self.labels_seen
        boundary = drifted or (bool(seen.any()) and bool((~seen[labels]).any()))
        seen[labels] = True
        self.labels_seen = seen
        return boundary

    def known(self) -> torch.Tensor:
        """The labels seen so far, ascending."""
        return self.labels_seen.nonzero().flatten()

    def state(self) -> dict[str, torch.Tensor]:
        return {KEY: self.labels_seen.clone()} if self.labels_seen.any() else {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore; a saved set that is not a bool vector of sane length is ignored."""
        seen = state.get(KEY)
        if seen is not None and seen.dtype == torch.bool and seen.dim() == 1 and len(seen) <= MAX_LABEL:
            self.labels_seen = seen.clone()
