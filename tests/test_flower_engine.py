"""End to end under Flower's simulation engine (Ray): the same apps, the same numbers."""

import pytest

from common.config import RunConfig
from fedtide.runtimes.flower_engine import run_flower_simulation
from fedtide.runtimes.inprocess import run_inprocess


@pytest.mark.slow
def test_flower_engine_matches_inprocess_runtime(tmp_path):
    # der with shifted memories: the client state Flower keeps holds stored logits and flags too
    config = RunConfig.of(rounds_per_task=2, local_epochs=2, quiet=True, method="der", replay_shift=1)
    flower = run_flower_simulation(config.replace(out=str(tmp_path / "flower")))
    local = run_inprocess(config.replace(out=str(tmp_path / "inprocess")))
    assert flower["rounds"] == local["rounds"] == config.num_rounds
    assert flower["rejected_replies"] == 0
    assert abs(flower["acc"] - local["acc"]) <= 0.01
    assert (tmp_path / "flower" / "model.safetensors").exists()


@pytest.mark.slow
def test_secure_aggregation_runs_under_flowers_engine_as_in_process(tmp_path):
    # SecAgg+'s keys live in the node's context.state between the protocol's messages
    config = RunConfig.of(num_tasks=1, rounds_per_task=2, quiet=True, secure_aggregation=True, secure_max_weight=2000)
    flower = run_flower_simulation(config.replace(out=str(tmp_path / "flower")))
    local = run_inprocess(config.replace(out=str(tmp_path / "inprocess")))
    assert flower["secure_aggregation"]["failed_rounds"] == local["secure_aggregation"]["failed_rounds"] == 0
    assert flower["rejected_replies"] == 0 and abs(flower["acc"] - local["acc"]) <= 0.01
