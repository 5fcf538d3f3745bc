"""Waiting for clients ends with a message; a late node still joins its round; a dead
upload does not stall the server."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from common.config import RunConfig
from common.errors import FedtideError
from common.schedule import TaskSchedule
from fedtide.runtimes.inprocess import InProcessGrid
from server.grids import wait_for_nodes
from server.history import RunHistory
from server.strategy import run_strategy


class Connected(InProcessGrid):
    """A grid whose connected nodes are whatever ``connected`` returns on each look."""

    def __init__(self, connected):
        super().__init__(None, [{}, {}, {}])
        self.connected = connected
        self.looks = 0

    def get_node_ids(self):
        self.looks += 1
        return list(self.connected(self.looks))


@pytest.fixture
def clock(monkeypatch):
    """A fake clock that ``time.sleep`` moves forward."""
    now = [0.0]
    monkeypatch.setattr("time.sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    return lambda: now[0]


def test_waiting_for_clients_gives_up_after_the_timeout_with_a_clear_message(clock):
    grid = Connected(lambda look: [1])
    with pytest.raises(FedtideError, match="only 1 of the 2 clients .* within 30 s"):
        wait_for_nodes(grid, minimum=2, timeout=30, clock=clock)
    assert 30 <= clock() <= 32


def test_waiting_ends_as_soon_as_enough_clients_are_connected(clock):
    grid = Connected(lambda look: [1] if look < 5 else [1, 2])
    wait_for_nodes(grid, minimum=2, timeout=30, clock=clock)
    assert grid.looks == 5


def _train_messages(config: RunConfig, grid, excluded=()):
    history = RunHistory(TaskSchedule.build(5, 8, config.data.clients, 0, 0))
    for node in excluded:
        history.node_excluded(0, node)
    strategy = run_strategy(config, history)
    arrays = ArrayRecord({"w": torch.zeros(3)})
    return list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))


def test_a_round_samples_every_node_that_connects_while_it_waits_for_the_minimum(clock):
    """Flower sizes its sample from the nodes connected when it first looks; a node that
    (re)connects a moment later must still train in that round."""
    grid = Connected(lambda look: [11] if look == 1 else [11, 12])
    messages = _train_messages(RunConfig.of(clients=2), grid)
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]


def test_an_excluded_node_that_went_away_is_not_waited_for(clock):
    grid = Connected(lambda look: [11, 12])  # node 13 was excluded, then disconnected
    messages = _train_messages(RunConfig.of(clients=3, client_wait=5), grid, excluded=[13])
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]


def test_a_reply_whose_upload_died_midway_stops_being_pulled_after_the_bound(monkeypatch):
    from flwr.superlink.grid import http_grid

    from server.grids import bound_reply_pulls

    seen = {}
    monkeypatch.setattr(http_grid, "pull_objects", lambda *args, **kwargs: seen.update(kwargs) or {})
    bound_reply_pulls(12.5)
    http_grid.pull_objects(["object-id"], pull_object_fn=None)
    assert seen["max_time"] == 12.5  # Flower's own default waits two hours


def test_the_strategy_on_the_inprocess_grid_samples_a_node_that_connects_while_it_waits(monkeypatch):
    """Flower sizes its sample from the nodes connected when it first looks; a node that
    (re)connects a moment later must still train in that round."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord

    from common.config import RunConfig
    from common.schedule import TaskSchedule
    from server.history import RunHistory
    from server.strategy import run_strategy

    from fedtide.runtimes.inprocess import InProcessGrid

    class ArrivingGrid(InProcessGrid):
        calls = 0

        def get_node_ids(self):
            self.calls += 1
            return [11] if self.calls == 1 else [11, 12]

    monkeypatch.setattr("time.sleep", lambda seconds: None)
    config = RunConfig.of(clients=2)
    strategy = run_strategy(config, RunHistory(TaskSchedule.build(5, 8, 2, 0, 0)))
    arrays = ArrayRecord({"w": torch.zeros(3)})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), ArrivingGrid(None, [{}, {}])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]
