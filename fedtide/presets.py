"""Named scenarios: the settings a researcher would otherwise retype for every run.

A preset only changes defaults; flags given on the command line still win.
"""

from __future__ import annotations

from typing import Any

from common.errors import FedtideError

_MNIST_FEDERATION: dict[str, Any] = {
    "clients": 10,
    "alpha": 1.0,
    "memory_size": 200,
    "rounds_per_task": 10,
    "local_epochs": 1,
    "batch_size": 32,
    "lr": 0.1,
    "lwf_alpha": 0.5,
}

PRESETS: dict[str, dict[str, Any]] = {
    "split-digits": {"dataset": "digits", "scenario": "class-incremental", "memory_size": 200},
    "split-mnist": {"dataset": "mnist", "scenario": "class-incremental", **_MNIST_FEDERATION},
    "split-fashion": {"dataset": "fashion-mnist", "scenario": "class-incremental", **_MNIST_FEDERATION},
    "permuted-mnist": {
        "dataset": "mnist", "scenario": "domain-incremental", "domain_transform": "permutation", **_MNIST_FEDERATION,
    },
    "rotated-mnist": {
        "dataset": "mnist", "scenario": "domain-incremental", "domain_transform": "rotation", **_MNIST_FEDERATION,
    },
    "mnist-fashion": {
        "dataset": "mnist", "scenario": "dataset-switch", "second_dataset": "fashion-mnist", "num_tasks": 2,
        **_MNIST_FEDERATION,
    },
    "concept-drift-mnist": {"dataset": "mnist", "scenario": "concept-drift", **_MNIST_FEDERATION},
    "async-split-mnist": {"dataset": "mnist", "scenario": "class-incremental", "async_spread": 3, **_MNIST_FEDERATION},
    # split-MNIST in simulated time: 20 clients, 10 slowest/fastest; FedBuff with 10 in flight, update every 5
    "fedbuff-split-mnist": {
        "dataset": "mnist", "scenario": "class-incremental", **_MNIST_FEDERATION, "clients": 20, "fraction_train": 0.5,
        "speed_spread": 10.0, "buffer_size": 5,
    },
    # 20 clients, 4 label permutations; each client switches 3 times at its own rounds, some back
    "distributed-drift-mnist": {
        **_MNIST_FEDERATION, "dataset": "mnist", "scenario": "distributed-drift", "num_tasks": 4, "clients": 20,
        "concept_switches": 3, "concept_recur": 0.5, "rounds_per_task": 8, "async_spread": 6, "method": "naive",
    },
}


def preset_settings(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise FedtideError(f"unknown scenario preset '{name}': use one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
