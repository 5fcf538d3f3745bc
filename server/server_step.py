"""The server's optimizer step: from the round's aggregate to the next global model.

FedOpt (Reddi et al., ICLR 2021) treats ``aggregate - global`` as a pseudo-gradient and
applies a server optimizer to it:
- ``ServerStep`` (FedAvg, and FedProx, whose proximal term lives on the clients): the
  aggregate is the new model;
- ``MomentumStep`` (FedAvgM, Hsu et al., 2019): heavy-ball momentum on the pseudo-gradient;
- ``AdamStep`` (FedAdam): Adam's two moments on it, with ``tau`` keeping the step finite.

The arithmetic follows Flower's FedAvgM and FedAdam term by term (same dtypes, same order),
so a run gives the numbers it gave with those classes; ``tests/test_server_step.py`` checks
agreement with them. A step's state between rounds is ``state()``: arrays under a key, for
checkpoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]


class ServerStep:
    """FedAvg: the aggregate becomes the global model."""

    name = "fedavg"

    def start_round(self, server_round: int, global_arrays: Arrays) -> None:
        """See the global model this round's clients start from."""

    def apply(self, server_round: int, aggregate: Arrays) -> Arrays:
        return aggregate

    def state(self) -> dict[str, Any]:
        """Arrays groups (``{name: ndarray}``) and JSON values under keys unique to this step."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore from ``state()``'s output; a key it lacks means the fresh value."""


class MomentumStep(ServerStep):
    """FedAvgM: v = momentum * v + (global - aggregate); new = global - lr * v.

    ``current`` is the server's own copy of the model, kept in the float64 the step computes
    in (the model sent to clients is cast back to its dtype)."""

    name = "fedavgm"

    def __init__(self, lr: float, momentum: float) -> None:
        self.lr = lr
        self.momentum = momentum
        self.current: list[np.ndarray] | None = None  # model order
        self.velocity: list[np.ndarray] | None = None
        self._names: list[str] = []

    def start_round(self, server_round: int, global_arrays: Arrays) -> None:
        if self.current is None:
            self._names = list(global_arrays)
            self.current = [global_arrays[name] for name in self._names]

    def apply(self, server_round: int, aggregate: Arrays) -> Arrays:
        if self.momentum == 0.0 and self.lr == 1.0:
            return aggregate  # plain FedAvg
        assert self.current is not None, "start_round comes before apply"
        names = self._names or list(aggregate)
        pseudo_gradient = [old - aggregate[name] for name, old in zip(names, self.current)]
        if self.momentum > 0.0:
            if self.velocity is None:
                self.velocity = pseudo_gradient
            else:
                self.velocity = [self.momentum * v + g for v, g in zip(self.velocity, pseudo_gradient)]
            pseudo_gradient = self.velocity
        self.current = [np.asarray(old - self.lr * g) for old, g in zip(self.current, pseudo_gradient)]
        return dict(zip(names, self.current))

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.velocity is not None:
            out["momentum_vector"] = {str(i): v for i, v in enumerate(self.velocity)}
        if self.current is not None:
            out["current_arrays"] = dict(zip(self._names, self.current))
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        group = state.get("momentum_vector")
        self.velocity = [group[str(i)] for i in range(len(group))] if group else None
        current = state.get("current_arrays")
        self._names = list(current) if current else []
        self.current = list(current.values()) if current else None


class AdamStep(ServerStep):
    """FedAdam: m = b1 m + (1 - b1) d; v = b2 v + (1 - b2) d^2 with d = aggregate - global;
    new = global + eta_t * m / (sqrt(v) + tau), eta_t bias-corrected as in Flower's FedAdam."""

    name = "fedadam"

    def __init__(self, eta: float, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.current: Arrays = {}
        self.m_t: Arrays = {}
        self.v_t: Arrays = {}

    def start_round(self, server_round: int, global_arrays: Arrays) -> None:
        self.current = dict(global_arrays)

    def apply(self, server_round: int, aggregate: Arrays) -> Arrays:
        delta = {name: x - self.current[name] for name, x in aggregate.items()}
        if not self.m_t:
            self.m_t = {name: np.zeros_like(x) for name, x in aggregate.items()}
        self.m_t = {name: self.beta_1 * m + (1 - self.beta_1) * delta[name] for name, m in self.m_t.items()}
        if not self.v_t:
            self.v_t = {name: np.zeros_like(x) for name, x in aggregate.items()}
        self.v_t = {name: self.beta_2 * v + (1 - self.beta_2) * delta[name] ** 2 for name, v in self.v_t.items()}
        eta_t = (
            self.eta
            * np.sqrt(1 - np.power(self.beta_2, server_round + 1.0))
            / (1 - np.power(self.beta_1, server_round + 1.0))
        )
        return {
            name: np.asarray(x + eta_t * self.m_t[name] / (np.sqrt(self.v_t[name]) + self.tau))
            for name, x in self.current.items()
        }

    def state(self) -> dict[str, Any]:
        return {key: value for key, value in (("m_t", self.m_t), ("v_t", self.v_t)) if value}

    def load_state(self, state: dict[str, Any]) -> None:
        self.m_t = dict(state.get("m_t", {}))
        self.v_t = dict(state.get("v_t", {}))


def server_step(strategy: str, server_lr: float, server_momentum: float) -> ServerStep:
    """The step ``--strategy`` names; fedprox is FedAvg's step (its term is on the clients)."""
    if strategy == "fedavgm":
        return MomentumStep(server_lr, server_momentum)
    if strategy == "fedadam":
        return AdamStep(server_lr)
    return ServerStep()
