import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.datasets import load_digits
from common.errors import FedtideError
from common.partition import dirichlet_partition
from common.scenarios import build_scenario


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


def test_class_incremental_tasks_have_disjoint_classes_and_cover_all():
    scenario = build_scenario(*_scenario_args(RunConfig()))
    seen: set[int] = set()
    for task in range(scenario.num_tasks):
        classes = set(scenario.test_data(task).y.tolist())
        for client in range(5):
            assert set(scenario.train_data(client, task).y.tolist()) <= classes
        assert not classes & seen
        seen |= classes
    assert seen == set(range(10))


def test_every_training_sample_used_once_and_no_test_sample_trained_on():
    scenario = build_scenario(*_scenario_args(RunConfig()))
    digits = load_digits()
    train_rows = [scenario.train_data(c, t).x for c in range(5) for t in range(5)]
    total = sum(len(x) for x in train_rows)
    assert total == len(digits.train)
    all_train = _rows(torch.cat(train_rows))
    assert len(all_train) == total  # no sample in two clients or two tasks
    assert not all_train & _rows(digits.test.x)


@pytest.mark.parametrize("transform", ["rotation", "permutation"])
def test_domain_incremental_keeps_labels_and_changes_inputs(transform):
    scenario = build_scenario(*_scenario_args(RunConfig.of(scenario="domain-incremental", domain_transform=transform)))
    first, second = scenario.test_data(0), scenario.test_data(1)
    assert torch.equal(first.y, second.y)
    assert set(first.y.tolist()) == set(range(10))
    assert not torch.allclose(first.x, second.x)
    assert torch.equal(first.x, load_digits().test.x)  # task 0 is the untouched data


def test_concept_drift_remaps_labels_of_the_same_inputs():
    scenario = build_scenario(*_scenario_args(RunConfig.of(scenario="concept-drift")))
    first, second = scenario.test_data(0), scenario.test_data(1)
    assert torch.equal(first.x, second.x)
    assert (first.y != second.y).all()


def test_dirichlet_partition_is_disjoint_complete_and_skewed():
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(labels, 5, alpha=0.3, rng=np.random.default_rng(0), min_per_group=1)
    merged = np.concatenate(parts)
    assert sorted(merged.tolist()) == list(range(1000))
    shares = np.array([[np.mean(labels[p] == c) for c in range(10)] for p in parts])
    assert shares.max() > 0.3  # small alpha: some client is dominated by few classes


def test_rounds_map_to_tasks():
    scenario = build_scenario(*_scenario_args(RunConfig.of(rounds_per_task=3)))
    assert [scenario.task_of(0, r) for r in range(1, 16)] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3


def test_too_many_clients_is_a_clear_error():
    with pytest.raises(FedtideError, match="clients"):
        build_scenario(*_scenario_args(RunConfig.of(clients=400, seed=123)))


def _scenario_args(config):
    return config.data, config.seed


def test_the_embedded_digits_are_scikit_learns_and_load_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sklearn_digits

    from common.datasets import digits_arrays

    images, labels = digits_arrays()
    reference = sklearn_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)
    # importing sklearn.datasets costs about 0.8 s of every run's start-up (benchmarks/startup.py)
    probe = "import sys; from common.datasets import load_digits; load_digits(); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
