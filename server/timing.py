"""Where a run's time goes: clients training (with message transfer), aggregation,
evaluation, and everything else (the overhead)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Iterator

from flwr.app import Message
from flwr.serverapp import Grid

from server.grids import GridWrapper


class PhaseTimes:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._started = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase; ``overhead`` is the rest of the wall time since creation."""
        total = time.perf_counter() - self._started
        out = {name: self.seconds.get(name, 0.0) for name in ("train", "aggregate", "evaluate")}
        out["overhead"] = max(total - sum(out.values()), 0.0)
        out["total"] = total
        return out


class TimedGrid(GridWrapper):
    """Counts the time spent waiting for training replies as ``train``."""

    def __init__(self, inner: Grid, times: PhaseTimes) -> None:
        super().__init__(inner)
        self.times = times

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        phase = "train" if messages and messages[0].metadata.message_type.startswith("train") else "client-evaluate"
        with self.times.phase(phase):
            return self.inner.send_and_receive(messages, timeout=timeout)
