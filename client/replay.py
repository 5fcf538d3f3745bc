"""Fixed-size sample memories, and the policies that decide which samples they keep.

- ``ReplayBuffer`` (policy ``reservoir``): reservoir sampling (Vitter's algorithm R). After
  ``seen`` samples went past, each one is in the buffer with probability ``capacity / seen``:
  a uniform sample of the whole stream, in bounded memory. A class that is rare in the
  client's stream is rare in its memory.
- ``ClassBalancedBuffer`` (policy ``class-balanced``): every class seen gets an equal share
  of the slots; a sample of a class holding fewer slots than the largest takes a slot of the
  largest (a random one), and within a class the samples kept are a reservoir of that
  class's stream. A client whose data is skewed (a Dirichlet split) still remembers each
  old class well enough to keep telling it apart.

``merge`` moves one memory's samples into another (see ``client.methods.replay``: a memory
filled at a boundary keeps the current task's samples aside until the client sees the task end).
"""

from __future__ import annotations

import torch

MAX_CLASSES = 1_000_000  # a saved class count longer than this is not a memory's


class ReplayBuffer:
    policy = "reservoir"
    tracks_labels = False  # whether ``_store`` keeps books by label (then it is told the slot's old one)

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
        """Offer every sample of a batch to the memory, in order; returns the slots
        written (a slot written twice by one batch is listed twice)."""
        x, y = x.detach().cpu(), y.detach().cpu()
        if self.x is None or self.y is None:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype)
            self.y = torch.zeros((self.capacity,), dtype=y.dtype)
        if x.shape[1:] != self.x.shape[1:] or len(x) != len(y):  # before any count moves
            raise ValueError(f"samples of shape {tuple(x.shape[1:])} cannot join a memory of {tuple(self.x.shape[1:])}")
        written: list[int] = []
        pending: dict[int, int] = {}  # slot -> the batch row it takes (a later row wins); copied at the end
        labels = y.tolist()
        for i, label in enumerate(labels):
            self.seen += 1
            if self.filled < self.capacity:
                slot = self.filled  # empty slots first (a memory restored into a larger capacity has some)
                self.filled += 1
            else:
                slot = self._slot_for(label)
            if slot < self.capacity:
                if self.tracks_labels:
                    self._store(slot, label, labels[pending[slot]] if slot in pending else int(self.y[slot]))
                pending[slot] = i
                written.append(slot)
            self._saw(label)
        if pending:
            slots, rows = list(pending), list(pending.values())
            self.x[slots] = x[rows]
            self.y[slots] = y[rows]
        return written

    def _slot_for(self, label: int) -> int:  # noqa: ARG002 - the class-balanced policy reads it
        """The full memory's slot a new sample takes, or ``capacity`` to drop it."""
        return int(torch.randint(0, self.seen, (1,), generator=self.generator))

    def _store(self, slot: int, label: int, previous: int) -> None:
        """Bookkeeping before ``slot``, which holds a sample of ``previous`` (any label when
        the slot is empty), is overwritten by a sample of ``label``."""

    def _saw(self, label: int) -> None:
        """Bookkeeping after a sample of ``label`` went past, kept or not."""

    def clear(self) -> None:
        """Forget every sample and count (the storage stays allocated)."""
        self.filled, self.seen = 0, 0

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored samples and labels (views), slot order."""
        if self.x is None or self.y is None:
            raise ValueError("the memory is empty")
        return self.x[: self.filled], self.y[: self.filled]

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
            self.seen = max(self.seen, keep)
            self.generator.set_state(state["rng"])


class ClassBalancedBuffer(ReplayBuffer):
    policy = "class-balanced"
    tracks_labels = True

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self.class_seen: dict[int, int] = {}  # samples of each class that went past
        self._slots: dict[int, list[int]] = {}  # the slots each class holds

    def _slot_for(self, label: int) -> int:
        held = len(self._slots.get(label, ()))
        largest = max(len(slots) for slots in self._slots.values())
        if held < largest:
            biggest = [c for c, slots in self._slots.items() if len(slots) == largest]
            victim = biggest[int(torch.randint(0, len(biggest), (1,), generator=self.generator))] if len(biggest) > 1 \
                else biggest[0]
            slots = self._slots[victim]
            return slots[int(torch.randint(0, len(slots), (1,), generator=self.generator))]
        r = int(torch.randint(0, self.class_seen.get(label, 0) + 1, (1,), generator=self.generator))
        return self._slots[label][r] if r < held else self.capacity

    def _store(self, slot: int, label: int, previous: int) -> None:
        held = self._slots.get(previous)
        if held is not None and slot in held:  # the slot held a sample: its class gives it up
            held.remove(slot)
        self._slots.setdefault(label, []).append(slot)

    def _saw(self, label: int) -> None:
        self.class_seen[label] = self.class_seen.get(label, 0) + 1

    def clear(self) -> None:
        super().clear()
        self.class_seen, self._slots = {}, {}

    def state(self) -> dict[str, torch.Tensor]:
        out = super().state()
        if self.class_seen:
            counts = torch.zeros(max(self.class_seen) + 1, dtype=torch.int64)
            for label, n in self.class_seen.items():
                counts[label] = n
            out["class-seen"] = counts
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state(state)
        self._slots = {}
        held = self.y[: self.filled].tolist() if self.y is not None else []
        for slot, label in enumerate(held):
            self._slots.setdefault(int(label), []).append(slot)
        counts = state.get("class-seen")
        self.class_seen = {label: len(slots) for label, slots in self._slots.items()}
        if (counts is not None and counts.dim() == 1 and len(counts) <= MAX_CLASSES
                and not counts.is_floating_point() and bool((counts >= 0).all())):
            for label, n in enumerate(counts.tolist()):
                if n:  # between what the memory holds and all it saw: a tampered count cannot starve a class
                    self.class_seen[label] = max(min(int(n), self.seen), self.class_seen.get(label, 0))


POLICIES = {"class-balanced": ClassBalancedBuffer, "reservoir": ReplayBuffer}


def make_buffer(policy: str, capacity: int, seed: int) -> ReplayBuffer:
    return POLICIES[policy](capacity, seed)


def merge(memory: ReplayBuffer, staged: ReplayBuffer) -> list[int]:
    """Move ``staged``'s samples into ``memory`` (and empty ``staged``), so that the memory
    stands for both streams as its policy would have, had it seen them in turn: a reservoir
    keeps each side in proportion to the samples it stands for, a class-balanced memory
    gives the new classes their share. Returns the memory slots written."""
    if len(staged) == 0:
        staged.clear()
        return []
    x, y = staged.samples()
    order = torch.randperm(len(y), generator=memory.generator)
    x, y = x[order].clone(), y[order].clone()
    if isinstance(memory, ClassBalancedBuffer) and isinstance(staged, ClassBalancedBuffer):
        written = memory.add(x, y)
        for label, n in staged.class_seen.items():  # the memory stands for all the stage saw, not its sample
            memory.class_seen[label] = memory.class_seen.get(label, 0) + n - int((y == label).sum())
    else:
        share = staged.seen / max(memory.seen + staged.seen, 1)
        take = min(len(y), max(1, round(memory.capacity * share)))
        free = list(range(len(memory), memory.capacity))[:take]
        evict = torch.randperm(len(memory), generator=memory.generator)[: take - len(free)].tolist()
        slots = free + evict
        if memory.x is None or memory.y is None:
            memory.x = torch.zeros((memory.capacity, *x.shape[1:]), dtype=x.dtype)
            memory.y = torch.zeros((memory.capacity,), dtype=y.dtype)
        for i, slot in enumerate(slots):
            memory.x[slot], memory.y[slot] = x[i], y[i]
        memory.filled += len(free)
        written = slots
    memory.seen += staged.seen - (len(y) if isinstance(memory, ClassBalancedBuffer) else 0)
    staged.clear()
    return written
