"""The fast paths give the numbers of the plain path; memory stays bounded as clients grow;
the speed benchmark runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from client.rounds import train_round
from client.vectorized import train_rounds_together
from common.config import RunConfig
from common.models import build_model
from common.scenarios import build_scenario
from fedtide.runtimes.inprocess import run_inprocess

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


@pytest.mark.parametrize("hidden", ["128,128", "48", "64,32,16"])
def test_vectorised_clients_match_one_by_one_training(hidden):
    config = RunConfig.of(num_tasks=1, clients=4, iid=True, client_samples=200, method="naive", local_epochs=2,
                       batch_size=16, drift_detector="adwin", hidden=hidden)
    scenario = build_scenario(config.data, config.seed)
    weights = build_model("mlp", scenario.input_shape, 10, config.network.hidden_widths, 0).state_dict()
    one_by_one = [train_round(config, p, 3, weights, {}) for p in range(4)]
    together = train_rounds_together(config, [(p, 3, {}) for p in range(4)], weights)
    for a, b in zip(one_by_one, together):
        for name in a.weights:
            assert torch.allclose(a.weights[name], b.weights[name], atol=1e-5)
        assert a.metrics["prequential-acc"] == b.metrics["prequential-acc"]
        assert a.metrics["train-loss"] == pytest.approx(b.metrics["train-loss"], rel=1e-4)
        assert torch.equal(a.state["drift.errors"], b.state["drift.errors"])


def test_clients_that_cannot_share_a_computation_are_left_to_the_plain_path():  # more: test_vectorized_methods
    config = RunConfig.of(num_tasks=1, clients=4, iid=True, client_samples=200)
    weights = build_model("mlp", build_scenario(config.data, config.seed).input_shape, 10, config.network.hidden_widths, 0).state_dict()
    assert train_rounds_together(config.replace(method="si"), [(0, 1, {}), (1, 1, {})], weights) is None  # per step
    frozen = config.replace(method="naive", freeze="features.1")
    assert train_rounds_together(frozen, [(0, 1, {}), (1, 1, {})], weights) is None  # frozen layers


def test_vectorised_run_matches_the_plain_run(tmp_path):
    config = RunConfig.of(num_tasks=2, clients=5, iid=True, client_samples=100, method="naive", rounds_per_task=2,
                       local_epochs=1, quiet=True)
    fast = run_inprocess(config.replace(out=str(tmp_path / "fast")), vectorize=True)
    plain = run_inprocess(config.replace(out=str(tmp_path / "plain")), vectorize=False)
    for fast_row, plain_row in zip(fast["accuracy_matrix"], plain["accuracy_matrix"], strict=True):
        assert fast_row == pytest.approx(plain_row, abs=0.005)


def _peak_rss_kib(clients: int, tmp_path: Path) -> int:
    code = (
        "import resource, sys; from common.config import RunConfig; from fedtide.runtimes.inprocess import run_inprocess; "
        f"run_inprocess(RunConfig.of(clients={clients}, iid=True, num_tasks=1, method='naive', rounds_per_task=2, "
        f"local_epochs=1, fraction_train=0.1, quiet=True, out=sys.argv[1])); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"c{clients}")], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def test_memory_stays_bounded_as_clients_grow(tmp_path):
    small, large = _peak_rss_kib(20, tmp_path), _peak_rss_kib(200, tmp_path)
    assert large < small * 1.25  # ten times the clients, far less than ten times the memory


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/datasets not present")
def test_speed_benchmark_runs_in_a_tiny_configuration():
    out = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--data-dir", str(SHARED), "--rounds", "2", "--skip-flower",
         "--scale", "100", "--json"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    result = json.loads(out)
    assert result["figures"]["max_acc_difference_points"] < 1.0
    assert result["a_fedtide_inprocess"]["peak_rss_mib"] > 0 and result["scale"][0]["clients"] == 100


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/datasets not present")
def test_continual_speed_benchmark_runs_in_a_tiny_configuration():
    out = subprocess.run(
        [sys.executable, "benchmarks/continual_speed.py", "--data-dir", str(SHARED), "--parts", "w2,scale,floor",
         "--skip-flower", "--rounds-per-task", "1", "--scale", "100", "--scale-rounds", "2", "--json"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    result = json.loads(out)
    ways = result["w2"]["ways"]
    assert set(ways) == {"a_fedtide", "b_client_by_client", "d_plain_loop"}
    assert result["w2"]["figures"]["acc_gap_points"] < 1.0  # batched and one by one learn the same
    assert all(w["process_seconds"] > 0 and 0 < w["acc"] <= 1 for w in ways.values())
    assert result["scale"][0]["clients"] == 100 and result["scale"][0]["peak_rss_mib"] > 0
    floor = result["floor"]  # each MNIST sample trained once a round, plus as many memories after task 1; all tested each round
    assert 60_000 < floor["trained_samples"] < 120_000 and floor["tested_samples"] == (5 + 1) * 10_000  # 5 rounds + round 0
