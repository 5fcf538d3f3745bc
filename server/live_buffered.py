"""Buffered asynchronous aggregation in real time, on real nodes (``fedtide server``, Flower's engine).

The same FedBuff as ``server.timed_rounds`` without a simulated clock: ``concurrency``
nodes are sent the global model (Flower's ``push_messages``), replies are pulled as they
come, and every ``buffer_size`` replies the global model is updated, each reply weighted
by its staleness (``server.staleness``). A node that is done is sent the new model at once,
so no update waits for a slow node; a node that does not answer within ``timeout``
seconds is freed (its late reply, if any, is never used). A node whose reply waits in the
buffer is not sent again before that reply is aggregated, so that its next message's receipt
says whether the reply was kept (an edge client uses each file once). Each update is one of
the run's rounds: it is evaluated and checkpointed like a synchronous round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from common.errors import FedtideError
from server.grids import wait_for_nodes
from server.sampling import idle_nodes
from server.strategy import FedtideStrategy

log = logging.getLogger("fedtide.server")
POLL_SECONDS = 0.05


def run_live_buffered(
    strategy: FedtideStrategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    num_rounds: int,
    timeout: float,
    buffer_size: int,
    concurrency: int,
    train_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
    after_round: Callable[[int, ArrayRecord], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ArrayRecord:
    """Updates ``first_round..num_rounds`` from ``arrays``; return the final global model.
    FedtideError when no node is left to train for ``--client-wait`` seconds."""
    if first_round == 1:
        evaluate_fn(0, arrays)
        after_round(0, arrays)
    in_flight: dict[str, tuple[int, float]] = {}  # message id -> (node, when sent)
    buffer: list[tuple[int, Message]] = []  # a node whose reply waits here is not sent again: its
    # receipt must be able to say whether that reply was kept
    server_round = first_round
    stalled_since: float | None = None
    staleness = strategy.staleness
    assert staleness is not None, "asynchronous aggregation needs the strategy's Staleness part"
    strategy.start_round(server_round, arrays)

    def refill() -> None:
        busy = {node for node, _ in in_flight.values()} | {node for node, _ in buffer}
        nodes = idle_nodes(grid, busy, strategy.excluded, concurrency)
        if not nodes:
            return
        messages = strategy.train_messages(server_round, arrays, ConfigRecord(dict(train_config)), nodes)
        pushed = {i for i in grid.push_messages(messages) if i}  # Flower answers None for one it could not push
        now = clock()
        for message in messages:
            node, message_id = message.metadata.dst_node_id, message.metadata.message_id
            if message_id and message_id in pushed:
                in_flight[message_id] = (node, now)
            else:
                staleness.unanswered(node)
                log.warning("round %d: the message to node %s could not be sent; another node trains instead",
                            server_round, strategy.history.label(node))

    # as a synchronous round does: nodes still connecting are waited for, up to --client-wait
    wait_for_nodes(grid, strategy.sampling.min_available, strategy.sampling.client_wait)
    refill()
    while server_round <= num_rounds:
        arrived = list(grid.pull_messages(list(in_flight))) if in_flight else []
        now = clock()
        for reply in arrived:
            node, _ = in_flight.pop(reply.metadata.reply_to_message_id, (reply.metadata.src_node_id, now))
            buffer.append((node, reply))
        for message_id, (node, sent) in list(in_flight.items()):
            if now - sent > timeout:  # gone or far too slow: free it, never use its reply
                del in_flight[message_id]
                staleness.unanswered(node)
                log.warning("round %d: node %s did not answer within --round-timeout %gs; it is free again",
                            server_round, strategy.history.label(node), timeout)
        if len(buffer) >= buffer_size:
            strategy.start_round(server_round, arrays)
            aggregated, _ = strategy.aggregate_train(server_round, [reply for _, reply in buffer])
            buffer = []
            if aggregated is not None:
                arrays = aggregated
                staleness.updated()
            evaluate_fn(server_round, arrays)
            after_round(server_round, arrays)
            server_round += 1
        if server_round <= num_rounds:
            refill()
        if in_flight or len(buffer) >= buffer_size:
            stalled_since = None
        elif stalled_since is None:
            stalled_since = now
        elif now - stalled_since > strategy.sampling.client_wait:
            raise FedtideError(
                f"round {server_round}: no node is left to train ({len(buffer)} of --buffer-size {buffer_size} "
                f"replies waiting) after {strategy.sampling.client_wait:g}s: start clients, or lower --buffer-size"
            )
        if not arrived:
            sleep(POLL_SECONDS)
    return arrays
