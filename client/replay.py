"""A fixed-size memory filled by reservoir sampling (Vitter's algorithm R).

After ``seen`` samples went past, each one is in the buffer with probability
``capacity / seen``: a uniform sample of the whole stream, in bounded memory.
"""

from __future__ import annotations

import torch


class ReplayBuffer:
    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self.filled = 0  # slots holding a sample: min(seen, capacity), unless capacity grew on restore
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        # saved with the state, so a restored client goes on with the same reservoir and replay draws
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.filled

    def add(self, x: torch.Tensor, y: torch.Tensor) -> list[int]:
        """Offer every sample of a batch to the reservoir, in order; returns the slots
        written (a slot written twice by one batch is listed twice)."""
        x, y = x.detach().cpu(), y.detach().cpu()
        if self.x is None:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype)
            self.y = torch.zeros((self.capacity,), dtype=y.dtype)
        written = []
        for i in range(x.shape[0]):
            if self.filled < self.capacity:
                slot = self.filled  # empty slots first (a memory restored into a larger capacity has some)
                self.filled += 1
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.generator))
            if slot < self.capacity:
                self.x[slot] = x[i]
                self.y[slot] = y[i]
                written.append(slot)
            self.seen += 1
        return written

    def sample_slots(self, n: int) -> torch.Tensor:
        """The slots of ``n`` stored samples drawn uniformly with replacement."""
        size = len(self)
        if size == 0 or self.x is None or self.y is None:
            raise ValueError("cannot sample from an empty replay buffer")
        return torch.randint(0, size, (n,), generator=self.generator)

    def state(self) -> dict[str, torch.Tensor]:
        if self.x is None or self.y is None:
            return {"seen": torch.tensor(self.seen)}
        return {
            "x": self.x[: len(self)].clone(),
            "y": self.y[: len(self)].clone(),
            "seen": torch.tensor(self.seen),
            "rng": self.generator.get_state(),
        }

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.seen = int(state["seen"])
        self.filled = 0
        if "x" in state:
            stored_x, stored_y = state["x"], state["y"]
            self.x = torch.zeros((self.capacity, *stored_x.shape[1:]), dtype=stored_x.dtype)
            self.y = torch.zeros((self.capacity,), dtype=stored_y.dtype)
            keep = min(len(stored_y), self.capacity)
            self.x[:keep] = stored_x[:keep]
            self.y[:keep] = stored_y[:keep]
            self.filled = keep
            self.generator.set_state(state["rng"])
