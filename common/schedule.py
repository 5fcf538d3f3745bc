"""When each client moves to its next task.

Synchronous drift: every client switches every ``rounds_per_task`` rounds. Asynchronous
drift (``async_spread`` > 0): client c switches ``offset[c]`` rounds later, with offsets
drawn uniformly from 0..spread, so at any round the federation holds clients on
different tasks. The run is ``spread`` rounds longer so that every client gets at least
``rounds_per_task`` rounds on every task.

A client's time is cut into segments of ``rounds_per_task`` rounds. In a task sequence,
segment s is task s. In distributed concept drift (``concepts``), each client has its own
sequence: segment s is concept ``concepts[client][s]``, so clients hold different concepts
at once and some return to a concept they had before (``concept_sequences``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.seeding import derive_seed

SCHEDULE_SEED_TAG = 7
CONCEPT_SEED_TAG = 8


@dataclass(frozen=True)
class TaskSchedule:
    num_tasks: int
    rounds_per_task: int
    offsets: tuple[int, ...]
    spread: int = 0
    concepts: tuple[tuple[int, ...], ...] = ()  # per client, the concept of each segment

    @classmethod
    def build(cls, num_tasks: int, rounds_per_task: int, clients: int, spread: int, seed: int,
              switches: int | None = None, recur: float = 0.0) -> "TaskSchedule":
        """``switches``: distributed concept drift, each client switches concept this many
        times (see ``concept_sequences``); None: one task after the other."""
        if spread == 0:
            offsets = (0,) * clients
        else:
            rng = np.random.default_rng(derive_seed(seed, SCHEDULE_SEED_TAG))
            offsets = tuple(int(o) for o in rng.integers(0, spread + 1, clients))
        concepts = () if switches is None else concept_sequences(num_tasks, clients, switches, recur, seed)
        return cls(num_tasks, rounds_per_task, offsets, spread, concepts)

    @property
    def segments(self) -> int:
        return len(self.concepts[0]) if self.concepts else self.num_tasks

    @property
    def num_rounds(self) -> int:
        return self.segments * self.rounds_per_task + self.spread

    def segment_of(self, client: int, server_round: int) -> int:
        """The segment ``client`` is in during a 1-based round."""
        local = max(server_round, 1) - 1 - self.offsets[client]
        return int(min(max(local // self.rounds_per_task, 0), self.segments - 1))

    def task_of(self, client: int, server_round: int) -> int:
        """Task (or concept) of ``client`` in a 1-based round."""
        segment = self.segment_of(client, server_round)
        return self.concepts[client][segment] if self.concepts else segment

    def rounds_into_task(self, client: int, server_round: int) -> int:
        """How many rounds ``client`` has already spent on its current task (0 in its first)."""
        return max(server_round, 1) - self._segment_start(client, self.segment_of(client, server_round))

    def _segment_start(self, client: int, segment: int) -> int:
        return 1 if segment == 0 else segment * self.rounds_per_task + 1 + self.offsets[client]

    def switch_round(self, client: int, task: int) -> int:
        """First round in which ``client`` trains on ``task`` (``num_rounds + 1`` if never)."""
        for segment in range(self.segments):
            if (self.concepts[client][segment] if self.concepts else segment) == task:
                return self._segment_start(client, segment)
        return self.num_rounds + 1

    def start_round(self, task: int) -> int:
        """First round in which any client trains on ``task``."""
        return 1 if task == 0 else min(self.switch_round(c, task) for c in range(len(self.offsets)))

    def end_round(self, task: int) -> int:
        """Last round before every client has left ``task``: where accuracy-matrix row ``task``
        is read. Concepts can recur until the end, so their rows are read at the end."""
        if self.concepts:
            return self.num_rounds
        return min((task + 1) * self.rounds_per_task + self.spread, self.num_rounds)

    def newest_task(self, server_round: int) -> int:
        return max(self.task_of(c, server_round) for c in range(len(self.offsets)))


def concept_sequences(concepts: int, clients: int, switches: int, recur: float, seed: int) -> tuple[tuple[int, ...], ...]:
    """Each client's concepts, one per segment: every client starts on concept 0 and switches
    ``switches`` times, each time to another concept; with probability ``recur`` (when it
    has had another one) back to a concept it had before, else to any other concept."""
    rng = np.random.default_rng(derive_seed(seed, CONCEPT_SEED_TAG))
    out = []
    for _ in range(clients):
        sequence = [0]
        for _ in range(switches):
            current = sequence[-1]
            earlier = sorted(set(sequence) - {current})
            if earlier and rng.random() < recur:
                sequence.append(int(rng.choice(earlier)))
            else:
                sequence.append(int(rng.choice([c for c in range(concepts) if c != current])))
        out.append(tuple(sequence))
    return tuple(out)
