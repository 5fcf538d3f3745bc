"""Rounds in simulated time: synchronous rounds that wait for their slowest client, and
buffered asynchronous aggregation (FedBuff) that waits for no one.

Each node takes a fixed number of simulated seconds per local round (``ClientSpeeds``:
log-normal over nodes, the slowest ``spread`` times the fastest, which takes 1 s). Time is
cut into virtual rounds of ``round_seconds``, the slowest node's time (what a synchronous
round of every node lasts). A client trains on the task of the virtual round in which it
is sent, so tasks switch at the same simulated times in both modes; the global model is
evaluated and checkpointed at the end of every virtual round, so a timed run has the same
per-round record, accuracy matrix and figures as any other run.

- **synchronous** (``buffer_size`` 0): a round sends the sampled nodes the global model and
  aggregates when the last of them is done: it lasts as long as its slowest client;
- **buffered asynchronous** (FedBuff, Nguyen et al., AISTATS 2022): ``concurrency`` nodes
  train at all times. Every reply joins a buffer; every ``buffer_size`` replies the global
  model is updated (each reply weighted by its staleness: ``server.staleness``), and a node
  that is done is replaced at once by an idle one, sampled at random.

A node trains when it is sent its message (the in-process runtimes answer at once) and its
reply is held until its simulated finish time. A node is never sent a second message while
one is out, so its state moves on as it would in real time, and the same seed gives the
same run.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from common.seeding import derive_seed
from server.sampling import idle_nodes
from server.strategy import FedtideStrategy

SPEED_SEED_TAG = 11


@dataclass(frozen=True)
class ClientSpeeds:
    """Simulated seconds each node takes for one local round."""

    seconds: dict[int, float]

    @classmethod
    def build(cls, nodes: list[int], spread: float, seed: int) -> "ClientSpeeds":
        """Log-normal over ``nodes`` (in id order), rescaled so that the fastest takes 1 s and
        the slowest ``spread`` s; every node 1 s when ``spread`` is 1 or there is one node."""
        nodes = sorted(nodes)
        z = np.random.default_rng(derive_seed(seed, SPEED_SEED_TAG)).standard_normal(len(nodes))
        if spread <= 1 or len(nodes) < 2 or z.max() == z.min():
            return cls({node: 1.0 for node in nodes})
        scaled = (z - z.min()) / (z.max() - z.min()) * math.log(spread)
        return cls({node: float(math.exp(s)) for node, s in zip(nodes, scaled)})

    @property
    def slowest(self) -> float:
        return max(self.seconds.values())


class TimedRun:
    """One run's clock, global model and messages in flight (see the module docstring)."""

    def __init__(
        self,
        strategy: FedtideStrategy,
        grid: Grid,
        arrays: ArrayRecord,
        speeds: ClientSpeeds,
        num_rounds: int,
        timeout: float,
        train_config: ConfigRecord,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
        after_round: Callable[[int, ArrayRecord], None],
    ) -> None:
        self.strategy = strategy
        self.grid = grid
        self.arrays = arrays
        self.speeds = speeds
        self.num_rounds = num_rounds
        self.timeout = timeout
        self.train_config = train_config
        self.evaluate_fn = evaluate_fn
        self.after_round = after_round
        self.round_seconds = speeds.slowest
        self.end = num_rounds * self.round_seconds
        self._slack = 1e-9 * self.round_seconds  # sums of durations drift from a round's end by float rounding
        self.now = 0.0
        self.closed = 0  # virtual rounds evaluated
        self.updates = 0  # times the global model changed
        self._in_flight: list[tuple[float, int, int, Message | None]] = []  # (finish, order, node, reply)
        self._order = 0

    # ---- the clock -------------------------------------------------------
    def virtual_round(self) -> int:
        return min(int((self.now + self._slack) // self.round_seconds) + 1, self.num_rounds)

    def _close_before(self, time: float) -> None:
        """Evaluate the global model at every virtual round's end before ``time`` (a time
        within float rounding of a round's end counts as that end)."""
        while self.closed < self.num_rounds and (self.closed + 1) * self.round_seconds < time - self._slack:
            self.closed += 1
            self.evaluate_fn(self.closed, self.arrays)
            self.after_round(self.closed, self.arrays)

    # ---- nodes -----------------------------------------------------------
    def _send(self, nodes: list[int], messages: list[Message] | None = None) -> None:
        """Train ``nodes`` on the current model now; their replies come back at their finish times."""
        if messages is None:
            config = ConfigRecord(dict(self.train_config))
            messages = self.strategy.train_messages(self.virtual_round(), self.arrays, config, nodes)
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        by_node: dict[int, Message] = {}
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            by_node[node] = reply
        for message in messages:
            node = message.metadata.dst_node_id
            finish = self.now + self.speeds.seconds.get(node, self.round_seconds)
            heapq.heappush(self._in_flight, (finish, self._order, node, by_node.get(node)))
            self._order += 1

    def _next(self) -> tuple[float, int, Message | None] | None:
        if not self._in_flight:
            return None
        finish, _, node, reply = heapq.heappop(self._in_flight)
        return finish, node, reply

    def _update(self, replies: list[Message], server_round: int) -> None:
        self.strategy.start_round(server_round, self.arrays)
        aggregated, _ = self.strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            self.arrays = aggregated
            self.updates += 1
            if self.strategy.staleness is not None:
                self.strategy.staleness.updated()

    # ---- the two modes ---------------------------------------------------
    def synchronous(self) -> ArrayRecord:
        self.evaluate_fn(0, self.arrays)
        self.after_round(0, self.arrays)
        while self.now < self.end - self._slack:
            sent_in = self.virtual_round()  # the round's replies are labelled with it
            messages = list(self.strategy.configure_train(sent_in, self.arrays,
                                                          ConfigRecord(dict(self.train_config)), self.grid))
            if not messages:
                break
            self._send([m.metadata.dst_node_id for m in messages], messages)
            finished = [heapq.heappop(self._in_flight) for _ in range(len(self._in_flight))]
            last = max(finish for finish, *_ in finished)
            if last > self.end + self._slack:  # a round that would end after the run does not count
                break
            self._close_before(last)
            self.now = last
            self._update([reply for *_, reply in finished if reply is not None], sent_in)
        self._close_before(math.inf)
        return self.arrays

    def buffered(self, buffer_size: int, concurrency: int) -> ArrayRecord:
        self.evaluate_fn(0, self.arrays)
        self.after_round(0, self.arrays)
        busy: set[int] = set()  # nodes training, or whose reply waits in the buffer
        buffer: list[tuple[int, Message]] = []

        def refill() -> None:
            nodes = idle_nodes(self.grid, busy, self.strategy.excluded, concurrency)
            if nodes:
                busy.update(nodes)
                self._send(nodes)

        self.strategy.start_round(self.virtual_round(), self.arrays)
        refill()
        while (event := self._next()) is not None:
            finish, node, reply = event
            if finish > self.end + self._slack:
                break
            self._close_before(finish)
            self.now = finish
            if reply is None:
                busy.discard(node)
                self.strategy.staleness.unanswered(node)
            else:
                buffer.append((node, reply))
            if len(buffer) >= buffer_size:
                self._update([r for _, r in buffer], self.virtual_round())
                busy.difference_update(n for n, _ in buffer)
                buffer = []
            refill()
        self._close_before(math.inf)
        return self.arrays


def run_timed(
    strategy: FedtideStrategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    speed_spread: float,
    seed: int,
    num_rounds: int,
    timeout: float,
    buffer_size: int,
    concurrency: int,
    train_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
    after_round: Callable[[int, ArrayRecord], None],
) -> tuple[ArrayRecord, dict[str, float]]:
    """Run ``num_rounds`` virtual rounds from ``arrays`` in simulated time; return the final
    global model and the run's time figures (``simulated_seconds``, ``round_seconds``,
    ``model_updates``)."""
    speeds = ClientSpeeds.build(list(grid.get_node_ids()), speed_spread, seed)
    run = TimedRun(strategy, grid, arrays, speeds, num_rounds, timeout, train_config, evaluate_fn, after_round)
    final = run.buffered(buffer_size, concurrency) if buffer_size > 0 else run.synchronous()
    return final, {"simulated_seconds": run.end, "round_seconds": run.round_seconds, "model_updates": run.updates}
