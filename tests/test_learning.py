"""On the embedded digits default, continual-learning methods do what a user relies on."""

import pytest

from common.config import RunConfig
from fedtide.runtimes.inprocess import run_inprocess


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {
        method: run_inprocess(RunConfig.of(method=method, out=str(out / method), quiet=True))
        for method in ("naive", "replay", "der")
    }


def test_replay_beats_naive_on_split_digits(default_runs):
    naive, replay = default_runs["naive"], default_runs["replay"]
    assert replay["acc"] >= naive["acc"] + 0.30
    assert replay["acc"] >= 0.70
    assert replay["bwt"] > naive["bwt"] + 0.30


def test_der_forgets_less_than_replay_on_split_digits(default_runs):
    # the same memories, also matched on their stored logits
    replay, der = default_runs["replay"], default_runs["der"]
    assert der["forgetting"] < replay["forgetting"] - 0.03
    assert der["acc"] > replay["acc"] + 0.02


def test_naive_forgets_old_classes(default_runs):
    naive = default_runs["naive"]
    assert naive["forgetting"] > 0.5
    assert naive["final_task_accuracies"][0] < 0.2


def test_same_seed_gives_the_same_numbers(tmp_path):
    config = RunConfig.of(rounds_per_task=1, local_epochs=1, quiet=True, method="replay+lwf")
    first = run_inprocess(config.replace(out=str(tmp_path / "a")))
    second = run_inprocess(config.replace(out=str(tmp_path / "b")))
    assert first["accuracy_matrix"] == second["accuracy_matrix"]


def test_worker_processes_give_the_same_numbers_as_one_process(tmp_path):
    config = RunConfig.of(rounds_per_task=1, local_epochs=1, quiet=True, method="replay+ewc", num_tasks=3)
    sequential = run_inprocess(config.replace(out=str(tmp_path / "one")))
    parallel = run_inprocess(config.replace(out=str(tmp_path / "two")), workers=2)
    assert parallel["accuracy_matrix"] == sequential["accuracy_matrix"]
    assert parallel["phase_seconds"]["train"] > 0
