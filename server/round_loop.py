"""The round loop: what Flower's ``Strategy.start`` does, from any round on.

Flower's loop always counts rounds from 1; a resumed run must go on at the round after the
last checkpoint, with the client seeds that derive from the server round. This loop makes
the same calls in the same order (so a fresh run computes the same numbers): configure
and send training, aggregate it, configure and send client-side evaluation, aggregate it,
evaluate the global model on the server, then ``after_round`` (a checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

log = logging.getLogger("fedtide")


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    first_round: int,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
    after_round: Callable[[int, ArrayRecord], None],
    stop_before: Callable[[int], str | None] | None = None,
    train_round: Callable[[Grid, int, ArrayRecord, ConfigRecord], ArrayRecord | None] | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds`` starting from the global model ``arrays``;
    return the final global model. A fresh run (``first_round`` 1) evaluates the initial
    model as round 0 first. ``timeout`` is how long a round waits for replies (seconds).
    ``stop_before(round)``: a reason to stop before that round (a privacy budget spent).
    ``train_round(grid, round, arrays, config)``: the round's training and aggregation in
    place of the strategy's (secure aggregation, ``server.secure_round``); None keeps the model."""
    if first_round == 1:
        evaluate_fn(0, arrays)
        after_round(0, arrays)
    for server_round in range(first_round, num_rounds + 1):
        if stop_before is not None and (reason := stop_before(server_round)):
            log.warning("stopping before round %d: %s", server_round, reason)
            break
        if train_round is not None:
            aggregated = train_round(grid, server_round, arrays, train_config)
        else:
            replies = grid.send_and_receive(
                strategy.configure_train(server_round, arrays, train_config, grid), timeout=timeout
            )
            aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:  # no valid reply: the model stays as it was
            arrays = aggregated
        replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, evaluate_config, grid), timeout=timeout
        )
        strategy.aggregate_evaluate(server_round, replies)
        evaluate_fn(server_round, arrays)
        after_round(server_round, arrays)
    return arrays
