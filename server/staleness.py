"""FedBuff's staleness: a reply computed from an old global model counts less.

In buffered asynchronous aggregation (``server.timed_rounds``) a client trains the global
model of the moment it was sent, and the server may have moved on by the time its reply
arrives. Its update (reply minus the model it started from) is ``tau`` versions stale; it
enters the aggregate scaled by ``1 / (1 + tau) ** exponent`` (Nguyen et al., AISTATS 2022,
use 1/sqrt(1 + tau)), on top of the current model:

    rebased = current + weight(tau) * (reply - base)

so the rules, caps and server steps that follow see an ordinary reply around the current
model. The base models are kept only while a reply may still arrive from them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]


class Staleness:
    """Which model each node started from, and how its reply is rebased."""

    def __init__(self, exponent: float = 0.5) -> None:
        self.exponent = exponent
        self.version = 0  # the current global model's version: how many updates it has had
        self.bases: dict[int, Arrays] = {}  # version -> that global model, while a node trains it
        # node -> versions it was sent, oldest first: a node answers its messages in order, and
        # may be sent the next one while its last reply still waits in the buffer
        self.started: dict[int, list[int]] = {}

    def weight(self, tau: int) -> float:
        return 1.0 / (1.0 + tau) ** self.exponent

    def sent(self, node: int, arrays: Arrays) -> None:
        """``node`` starts training the current model (``arrays``)."""
        self.bases.setdefault(self.version, arrays)
        self.started.setdefault(node, []).append(self.version)

    def reference(self, node: int) -> Arrays | None:
        """The model ``node``'s reply is an update of (None: not sent by this loop)."""
        versions = self.started.get(node)
        return self.bases.get(versions[0]) if versions else None

    def rebase(self, node: int, reply: Arrays, current: Arrays) -> tuple[Arrays, int]:
        """The reply (``node``'s oldest unanswered message's) as an update of ``current``,
        weighted by its staleness; and that staleness."""
        version = self._pop(node, oldest=True)
        if version is None or version not in self.bases:
            return reply, 0
        tau = self.version - version
        scale = self.weight(tau)
        base = self.bases[version]
        out = {}
        for name, value in reply.items():
            if np.issubdtype(value.dtype, np.floating):
                moved = current[name].astype(np.float64) + scale * (value.astype(np.float64) - base[name].astype(np.float64))
                out[name] = moved.astype(value.dtype)
            else:
                out[name] = current[name]
        return out, tau

    def updated(self) -> None:
        """The global model moved on: forget the bases no node trains any more."""
        self.version += 1
        needed = {v for versions in self.started.values() for v in versions}
        self.bases = {v: a for v, a in self.bases.items() if v in needed}

    def rejected(self, node: int) -> None:
        """``node``'s reply arrived but will not be used: it answers its oldest message."""
        self._pop(node, oldest=True)

    def unanswered(self, node: int) -> None:
        """``node``'s latest message will never be answered (not sent, or timed out)."""
        self._pop(node, oldest=False)

    def _pop(self, node: int, oldest: bool) -> int | None:
        versions = self.started.get(node)
        if not versions:
            return None
        version = versions.pop(0 if oldest else -1)
        if not versions:
            del self.started[node]
        return version

    def state(self) -> dict[str, Any]:
        return {"staleness": {"version": self.version}}

    def load_state(self, state: dict[str, Any]) -> None:
        if "staleness" in state:
            self.version = int(state["staleness"]["version"])
