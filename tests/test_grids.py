"""Waiting for clients ends: a run whose clients never come says so instead of hanging."""

from __future__ import annotations

import pytest

from common.errors import FedtideError
from server.grids import PatientGrid


class FakeGrid:
    def __init__(self, connected):
        self.connected = connected

    def get_node_ids(self):
        return list(self.connected)


def test_waiting_for_clients_gives_up_after_the_timeout_with_a_clear_message():
    now = [0.0]
    grid = PatientGrid(FakeGrid([1]), minimum=2, timeout=30, clock=lambda: now[0])
    assert grid.get_node_ids() == [1]  # short: Flower polls again a second later
    now[0] = 29
    assert grid.get_node_ids() == [1]
    now[0] = 31
    with pytest.raises(FedtideError, match="only 1 of the 2 clients .* within 30 s"):
        grid.get_node_ids()


def test_the_wait_restarts_once_enough_clients_were_connected():
    now = [0.0]
    inner = FakeGrid([1])
    grid = PatientGrid(inner, minimum=2, timeout=30, clock=lambda: now[0])
    grid.get_node_ids()
    now[0] = 20
    inner.connected = [1, 2]
    assert grid.get_node_ids() == [1, 2]
    inner.connected = [1]  # a client dropped out later in the run
    now[0] = 45
    assert grid.get_node_ids() == [1]  # a new wait starts now, not at 0
    now[0] = 70
    assert grid.get_node_ids() == [1]


def test_a_reply_whose_upload_died_midway_stops_being_pulled_after_the_bound(monkeypatch):
    from flwr.superlink.grid import http_grid

    from server.grids import bound_reply_pulls

    seen = {}
    monkeypatch.setattr(http_grid, "pull_objects", lambda *args, **kwargs: seen.update(kwargs) or {})
    bound_reply_pulls(12.5)
    http_grid.pull_objects(["object-id"], pull_object_fn=None)
    assert seen["max_time"] == 12.5  # Flower's own default waits two hours


def test_a_round_samples_every_node_that_connects_while_it_waits_for_the_minimum(monkeypatch):
    """Flower sizes its sample from the nodes connected when it first looks; a node that
    (re)connects a moment later must still train in that round."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord

    from common.config import RunConfig
    from common.schedule import TaskSchedule
    from server.history import RunHistory
    from server.strategy import build_strategy

    from fedtide.inprocess import InProcessGrid

    class ArrivingGrid(InProcessGrid):
        calls = 0

        def get_node_ids(self):
            self.calls += 1
            return [11] if self.calls == 1 else [11, 12]

    monkeypatch.setattr("time.sleep", lambda seconds: None)
    config = RunConfig(clients=2)
    strategy = build_strategy(config, RunHistory(TaskSchedule.build(5, 8, 2, 0, 0)))
    arrays = ArrayRecord({"w": torch.zeros(3)})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), ArrivingGrid(None, [{}, {}])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12]
