"""Which nodes a round asks: a fraction of those connected, never an excluded node."""

from __future__ import annotations

import random

from flwr.serverapp import Grid

from server.grids import GridWrapper, wait_for_nodes


class NodeSampling:
    """Which nodes a round asks: ``fraction`` of those connected (at least one), never an
    excluded node, after waiting up to ``client_wait`` seconds for ``min_available`` nodes."""

    def __init__(self, fraction_train: float, fraction_evaluate: float, min_available: int, client_wait: float) -> None:
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_available = min_available
        self.client_wait = client_wait

    def sample(self, grid: Grid, fraction: float, excluded: set[int]) -> list[int] | None:
        """Node ids, in Flower's sampling order (``random.sample``); None when every node is excluded."""
        minimum = self.min_available
        if excluded:
            grid = _GridWithout(grid, excluded)
            if not list(grid.get_node_ids()):
                return None
            minimum = max(0, minimum - len(excluded))
        # Flower's strategies size the sample from the nodes connected at the moment they look:
        # wait for the minimum first, or a node that reconnects a second late misses the round
        wait_for_nodes(grid, minimum, self.client_wait)
        size = max(int(len(list(grid.get_node_ids())) * fraction), 1)
        wait_for_nodes(grid, max(minimum, size), self.client_wait)
        return random.sample(list(grid.get_node_ids()), size)


def idle_nodes(grid: Grid, busy: set[int], excluded: set[int], concurrency: int) -> list[int]:
    """Asynchronous aggregation: nodes to send work so that ``concurrency`` are busy, drawn at
    random (Flower's ``random``, seeded by the run) among the connected ones that are neither
    busy nor excluded."""
    idle = sorted(set(grid.get_node_ids()) - busy - excluded)
    count = min(concurrency - len(busy), len(idle))
    return random.sample(idle, count) if count > 0 else []


class _GridWithout(GridWrapper):
    """A view of a grid that hides some nodes from sampling; everything else passes through."""

    def __init__(self, grid: Grid, hidden: set[int]) -> None:
        super().__init__(grid)
        self._hidden = hidden

    def get_node_ids(self) -> list[int]:
        return [node for node in self.inner.get_node_ids() if node not in self._hidden]
