"""Client-level differential privacy (``--dp client``): DP-FedAvg on the server, with its budget.

Each round, every accepted reply's update (its weights minus the global model it was sent,
decoded first when compressed) is clipped to L2 norm ``clip`` over all its float tensors; the
clipped updates are summed, Gaussian noise of standard deviation ``noise * clip`` is added to
every coordinate, and the sum is divided by the **expected** number of replies (the sampled
fraction times the clients), never by the count that arrived, so that one client's presence
changes the mean by at most ``clip / expected`` (McMahan et al., 2018). Replies count alike:
``num-examples`` is ignored, as it must be for the bound to hold.

The budget (epsilon at ``delta``) is computed by Opacus's RDP accountant for the subsampled
Gaussian mechanism, one step per round at sampling rate q = the round's sampled nodes over the
federation's clients. **Poisson sampling of clients is assumed**: Flower samples a fixed number
of nodes without replacement, which the accountant does not model exactly. Outside the
guarantee: what clients report beside their update (metrics: prequential accuracy, drift
flags, losses, the sample count) and what stays on a device (replay memory, EWC's Fisher); and
the replies validation drops (a malformed reply is dropped whatever its data).

The noise comes from the operating system's entropy: a noise anyone could recompute (from the
run's seed, which ``config.json`` records) could be subtracted, and would protect no one. Only
``--dp-reproducible`` (research) draws it from the seed.

Clipping happens here, in fedtide's decode path, not in Flower's ``DifferentialPrivacy*``
wrappers or client mods: those wrap a plain FedAvg strategy and expect uncompressed arrays,
while fedtide's strategy validates, unpacks compressed updates and runs its own hooks; and
Flower's accountant needs ``flwr[dp]``, whose pinned dp-accounting conflicts with this
environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


from server.reply_metrics import SPENT

Arrays = dict[str, np.ndarray]


@dataclass
class ClientLevelDP:
    """DP-FedAvg's aggregation and its accountant. ``clients``: the federation's clients
    (the denominator's base); ``seed``: the noise's random stream (per round) when
    reproducible, else None: the operating system's entropy, which no one can predict."""

    clip: float
    noise: float
    delta: float
    clients: int
    seed: int | None = None
    target_epsilon: float = 0.0
    steps: list[tuple[float, float]] = field(default_factory=list)  # (noise, sampling rate) per round
    clipped: int = 0  # updates that were longer than ``clip``
    _rdp: dict[tuple[float, float], np.ndarray] = field(default_factory=dict, repr=False)  # one step's RDP per order

    def aggregate(self, server_round: int, replies: list[Arrays], reference: Arrays, sampled: int) -> Arrays:
        """The new model: ``reference`` plus the noised mean of the clipped updates; ``sampled``:
        nodes sent training this round (the expected replies)."""
        total = {name: np.zeros(base.shape, np.float64) for name, base in reference.items()
                 if np.issubdtype(base.dtype, np.floating)}
        for reply in replies:
            update = {name: reply[name].astype(np.float64) - reference[name] for name in total}
            norm = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
            scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
            self.clipped += int(scale < 1.0)
            for name, u in update.items():
                total[name] += u * scale
        return self._noised_mean(server_round, total, reference, sampled)

    def aggregate_sum(self, server_round: int, total: Arrays, reference: Arrays, sampled: int) -> Arrays:
        """The new model from the sum of updates that their clients clipped to ``clip``
        themselves (secure aggregation: the server sees only the sum)."""
        return self._noised_mean(server_round, {name: np.asarray(u, np.float64) for name, u in total.items()},
                                 reference, sampled)

    def _noised_mean(self, server_round: int, total: Arrays, reference: Arrays, sampled: int) -> Arrays:
        expected = max(sampled, 1)
        rng = np.random.default_rng(None if self.seed is None else [self.seed, server_round, 0xD1FF])
        out = dict(reference)
        for name, summed in total.items():
            noised = summed + rng.normal(0.0, self.noise * self.clip, size=summed.shape)
            out[name] = reference[name] + noised / expected
        self.steps.append((self.noise, min(1.0, sampled / self.clients)))
        return out

    def epsilon(self, extra_steps: list[tuple[float, float]] = ()) -> float:
        """Epsilon at ``delta`` after the rounds so far (and ``extra_steps``): Opacus's RDP
        accountant, as its ``RDPAccountant`` computes it (same orders), with each distinct
        (noise, rate) step's RDP computed once and summed (RDP composes by addition)."""
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        steps = [*self.steps, *extra_steps]
        if not steps:
            return 0.0
        orders = RDPAccountant.DEFAULT_ALPHAS
        total = np.zeros(len(orders))
        for step in set(steps):
            if step not in self._rdp:
                self._rdp[step] = np.asarray(compute_rdp(q=step[1], noise_multiplier=step[0], steps=1, orders=orders))
            total += steps.count(step) * self._rdp[step]
        epsilon, _ = get_privacy_spent(orders=orders, rdp=total, delta=self.delta)
        return float(epsilon)

    def next_round_exceeds(self, sampled_rate: float) -> bool:
        """Whether one more round at ``sampled_rate`` would pass ``target_epsilon``."""
        return self.target_epsilon > 0 and self.epsilon([(self.noise, sampled_rate)]) > self.target_epsilon

    def state(self) -> dict[str, Any]:
        return {"dp_steps": [list(step) for step in self.steps], "dp_clipped": self.clipped}

    def load_state(self, state: dict[str, Any]) -> None:
        if "dp_steps" in state:
            self.steps = [(float(n), float(q)) for n, q in state["dp_steps"]]
            self.clipped = int(state.get("dp_clipped", 0))

    def summary(self) -> dict[str, Any]:
        return {"dp": {
            "level": "client", "epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise,
            "clip": self.clip, "rounds": len(self.steps), "clipped_updates": self.clipped,
            "sampling": "Poisson sampling of clients assumed, q = sampled nodes / clients each round",
            "accountant": "Opacus RDP",
        }}


def sample_dp_summary(privacy: Any, rounds: list[Any]) -> dict[str, Any]:
    """``--dp sample``: the budget as the clients report it (each keeps its own accountant on
    its device, ``client.dp_sgd``); the run's epsilon is the largest any client reported."""
    spent = [r.epsilon for r in rounds if r.epsilon is not None]
    return {"dp": {
        "level": "sample", "epsilon": max(spent) if spent else 0.0, "delta": privacy.dp_delta,
        "noise_multiplier": privacy.dp_noise, "clip": privacy.dp_clip, "rounds": len(rounds),
        "clients_budget_spent": sum(1 for r in rounds for c in r.rejected if SPENT in c.get("reason", "")),
        "sampling": "Poisson sampling of each step's batch, new samples and memories alike; each step accounted at "
                    "the larger of the two rates, every round the client trains: a memory pays at every step",
        "accountant": "Opacus RDP, on each client; the largest epsilon any client reported",
    }}

