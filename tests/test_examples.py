"""The two example Flower apps in examples/ run under Flower's simulation engine: fedtide's
continual client inside a plain FedAvg app, and fedtide's strategy driving plain clients."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _simulate(monkeypatch, app: str, nodes: int):
    """Run examples/<app> under Flower's simulation engine; return its server module."""
    from flwr.simulation import run_simulation

    folder = str(EXAMPLES / app)
    monkeypatch.syspath_prepend(folder)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([folder, os.environ.get("PYTHONPATH", "")]))  # Ray's workers
    server = importlib.import_module(f"{app}.server_app")
    client = importlib.import_module(f"{app}.client_app")
    backend = {"init_args": {"num_cpus": 2, "include_dashboard": False}, "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    run_simulation(server_app=server.app, client_app=client.app, num_supernodes=nodes, backend_config=backend)
    return server


@pytest.mark.slow
def test_continual_client_example_learns_every_digit_pair_under_plain_fedavg(monkeypatch):
    server = _simulate(monkeypatch, "continual_client", nodes=2)
    assert len(server.accuracies) == 11  # the initial model, then 10 rounds
    # 5 tasks of two digits each: without replay the last pair alone would leave ~20%
    assert server.accuracies[-1] > 0.5, server.accuracies


@pytest.mark.slow
def test_robust_server_example_drops_the_broken_client_and_still_learns(monkeypatch):
    server = _simulate(monkeypatch, "robust_server", nodes=4)
    strategy = server.strategies[-1]
    dropped = strategy.history.rejects_so_far()
    assert dropped and all("NaN" in r["reason"] or "num-examples" in r["reason"] for r in dropped)
    assert server.accuracies[-1] > 0.8 > server.accuracies[0], server.accuracies
