"""Evaluate a global model on the held-out test set of every task."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from common.evaluation import accuracy
from common.config import RunConfig
from common.devices import resolve_device
from common.models import build_model
from common.scenarios import Scenario


class TaskEvaluator:
    """Keeps one model instance and loads each round's weights into it."""

    def __init__(self, config: RunConfig, scenario: Scenario) -> None:
        self.scenario = scenario
        self.device = resolve_device(config.learner.device)
        self.model = build_model(
            config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths, config.seed
        ).to(self.device)

    def __call__(self, weights: dict[str, torch.Tensor], tasks: list[int] | None = None) -> list[float]:
        """Accuracy (fraction) on the test set of every task (seen or not: unseen ones give
        FWT), or of ``tasks`` in that order."""
        self.model.load_state_dict(weights)
        tasks = list(range(self.scenario.num_tasks)) if tasks is None else tasks
        return [accuracy(self.model, self.scenario.test_data(t), self.device)[0] for t in tasks]


def served_accuracy(evaluate: TaskEvaluator, served: dict[int, ArrayRecord], tasks: dict[int, int],
                    known: tuple[ArrayRecord, list[float]] | None = None) -> float | None:
    """Mean over nodes of the accuracy of the model each is served on the test set of the
    task it trains on (what a client gets from the federation right now); None with no node.
    Each distinct model is evaluated once, on the tasks its nodes need; ``known``: a model
    whose accuracies on every task are already computed."""
    groups: dict[int, tuple[ArrayRecord, list[int]]] = {}
    for node, model in served.items():
        if node in tasks:
            groups.setdefault(id(model), (model, []))[1].append(node)
    scores = []
    for model, nodes in groups.values():
        needed = sorted({tasks[n] for n in nodes})
        if known is not None and model is known[0]:
            by_task = {t: known[1][t] for t in needed}
        else:
            by_task = dict(zip(needed, evaluate(model.to_torch_state_dict(), needed)))
        scores += [by_task[tasks[n]] for n in nodes]
    return float(sum(scores) / len(scores)) if scores else None
