"""When each client moves to its next task.

Synchronous drift: every client switches every ``rounds_per_task`` rounds. Asynchronous
drift (``async_spread`` > 0): client c switches ``offset[c]`` rounds later, with offsets
drawn uniformly from 0..spread, so at any round the federation holds clients on
different tasks. The run is ``spread`` rounds longer so that every client gets at least
``rounds_per_task`` rounds on every task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.seeding import derive_seed

SCHEDULE_SEED_TAG = 7


@dataclass(frozen=True)
class TaskSchedule:
    num_tasks: int
    rounds_per_task: int
    offsets: tuple[int, ...]
    spread: int = 0

    @classmethod
    def build(cls, num_tasks: int, rounds_per_task: int, clients: int, spread: int, seed: int) -> "TaskSchedule":
        if spread == 0:
            return cls(num_tasks, rounds_per_task, (0,) * clients, 0)
        rng = np.random.default_rng(derive_seed(seed, SCHEDULE_SEED_TAG))
        return cls(num_tasks, rounds_per_task, tuple(int(o) for o in rng.integers(0, spread + 1, clients)), spread)

    @property
    def num_rounds(self) -> int:
        return self.num_tasks * self.rounds_per_task + self.spread

    def task_of(self, client: int, server_round: int) -> int:
        """Task of ``client`` in a 1-based round."""
        local = max(server_round, 1) - 1 - self.offsets[client]
        return int(min(max(local // self.rounds_per_task, 0), self.num_tasks - 1))

    def rounds_into_task(self, client: int, server_round: int) -> int:
        """How many rounds ``client`` has already spent on its current task (0 in its first)."""
        task = self.task_of(client, server_round)
        first = 1 if task == 0 else self.switch_round(client, task)
        return max(server_round, 1) - first

    def switch_round(self, client: int, task: int) -> int:
        """First round in which ``client`` trains on ``task`` (task >= 1)."""
        return task * self.rounds_per_task + 1 + self.offsets[client]

    def start_round(self, task: int) -> int:
        """First round in which any client trains on ``task``."""
        return 1 if task == 0 else min(self.switch_round(c, task) for c in range(len(self.offsets)))

    def end_round(self, task: int) -> int:
        """Last round before every client has left ``task``: where accuracy-matrix row ``task`` is read."""
        return min((task + 1) * self.rounds_per_task + self.spread, self.num_rounds)

    def newest_task(self, server_round: int) -> int:
        return max(self.task_of(c, server_round) for c in range(len(self.offsets)))
