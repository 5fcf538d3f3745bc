"""The server optimizer steps agree with Flower's FedAvgM and FedAdam, and survive a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM

from server.server_step import AdamStep, MomentumStep, ServerStep, server_step


@pytest.fixture(autouse=True)
def _message_identity():
    """Flower's Message needs the identity of the run that sends it."""
    from fedtide.runtimes.inprocess import InProcessGrid

    InProcessGrid(None, [])  # sets the identity of an in-process run


class _Grid:
    """Just enough of a Grid for Flower's configure_train to sample nodes."""

    def get_node_ids(self):
        return [1, 2]


def _reply(arrays: dict[str, np.ndarray], node: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 1})})
    message = Message(content=content, dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=message)


def _flower_rounds(strategy, start: dict[str, np.ndarray], aggregates: list[dict[str, np.ndarray]]):
    """Flower's strategy over rounds in which the (single) reply is the aggregate."""
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    out = []
    for server_round, aggregate in enumerate(aggregates, start=1):
        list(strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid()))
        new, _ = strategy.aggregate_train(server_round, [_reply(aggregate, 1)])
        arrays = ArrayRecord({k: Array(a.numpy().astype(np.float32)) for k, a in new.items()})
        out.append({k: a.numpy() for k, a in new.items()})
    return out


def _our_rounds(step: ServerStep, start: dict[str, np.ndarray], aggregates: list[dict[str, np.ndarray]]):
    current = start
    out = []
    for server_round, aggregate in enumerate(aggregates, start=1):
        step.start_round(server_round, current)
        new = step.apply(server_round, aggregate)
        current = {k: np.asarray(v).astype(np.float32) for k, v in new.items()}
        out.append(new)
    return out


def _sequence(seed: int = 0, rounds: int = 4):
    gen = np.random.default_rng(seed)
    start = {"w": gen.normal(size=(4, 3)).astype(np.float32), "b": gen.normal(size=3).astype(np.float32)}
    aggregates = [{k: (v + gen.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in start.items()}
                  for _ in range(rounds)]
    return start, aggregates


@pytest.mark.parametrize("lr,momentum", [(1.0, 0.9), (0.5, 0.0), (1.0, 0.0)])
def test_momentum_step_agrees_with_flowers_fedavgm(lr, momentum):
    start, aggregates = _sequence()
    flower = _flower_rounds(FedAvgM(server_learning_rate=lr, server_momentum=momentum, min_available_nodes=1,
                                    min_train_nodes=1, fraction_evaluate=0.0), start, aggregates)
    ours = _our_rounds(MomentumStep(lr, momentum), start, aggregates)
    for theirs, mine in zip(flower, ours):
        for name in start:
            np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-6, atol=0)


def test_adam_step_agrees_with_flowers_fedadam():
    start, aggregates = _sequence(seed=1)
    flower = _flower_rounds(FedAdam(eta=0.01, min_available_nodes=1, min_train_nodes=1, fraction_evaluate=0.0),
                            start, aggregates)
    ours = _our_rounds(AdamStep(0.01), start, aggregates)
    for theirs, mine in zip(flower, ours):
        for name in start:
            np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_a_step_restored_from_its_state_goes_on_as_if_never_stopped(strategy):
    start, aggregates = _sequence(seed=2, rounds=5)
    whole = _our_rounds(server_step(strategy, 0.05, 0.9), start, aggregates)
    first = server_step(strategy, 0.05, 0.9)
    _our_rounds(first, start, aggregates[:3])
    resumed = server_step(strategy, 0.05, 0.9)
    resumed.load_state(first.state())
    current = {k: np.asarray(v).astype(np.float32) for k, v in whole[2].items()}
    rest = []
    for server_round, aggregate in enumerate(aggregates[3:], start=4):
        resumed.start_round(server_round, current)
        new = resumed.apply(server_round, aggregate)
        current = {k: np.asarray(v).astype(np.float32) for k, v in new.items()}
        rest.append(new)
    for expected, got in zip(whole[3:], rest):
        for name in start:
            assert np.array_equal(expected[name], got[name])


def test_fedavg_and_fedprox_take_the_aggregate_as_it_is():
    start, aggregates = _sequence()
    for strategy in ("fedavg", "fedprox"):
        assert _our_rounds(server_step(strategy, 1.0, 0.9), start, aggregates)[-1] is aggregates[-1]


def test_a_step_whose_model_is_not_kept_leaves_its_state_as_it_was():
    """A round whose new model is not finite keeps the old model, and the server step's
    momentum or moments stay those of the model that is kept."""
    from flwr.clientapp import ClientApp

    from fedtide.runtimes.inprocess import InProcessGrid
    from server.history import RunHistory
    from server.sampling import NodeSampling
    from server.strategy import FedtideStrategy
    from server.validation import ReplyValidator

    start = {"w": np.ones((2, 2), dtype=np.float32)}
    app = ClientApp()

    @app.train()
    def train(msg, context):
        server_round = int(msg.content["config"]["server-round"])
        value = 1.5 if server_round == 1 else 3e38  # round 2: a huge, finite step to the float32 limit
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full((2, 2), value, dtype=np.float32))}),
                              "metrics": MetricRecord({"num-examples": 1})})
        return Message(content=content, reply_to=msg)

    for step in (MomentumStep(lr=10.0, momentum=0.9),):
        strategy = FedtideStrategy(history=RunHistory(), validator=ReplyValidator(10),
                                   sampling=NodeSampling(1.0, 0.0, 1, 60.0), step=step)
        grid = InProcessGrid(app, [{"partition-id": 0}])
        arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
        list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        first, _ = strategy.aggregate_train(1, grid.send_and_receive(
            strategy.configure_train(1, arrays, ConfigRecord(), grid)))
        kept = {k: {n: np.array(a) for n, a in v.items()} if isinstance(v, dict) else v for k, v in step.state().items()}
        replies = grid.send_and_receive(strategy.configure_train(2, first, ConfigRecord(), grid))
        assert strategy.aggregate_train(2, replies) == (None, None)  # the model is not finite: not kept
        after = step.state()
        assert set(after) == set(kept)
        for key, group in kept.items():
            assert all(np.array_equal(group[n], after[key][n]) for n in group), key
