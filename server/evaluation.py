"""Evaluate a global model on the held-out test set of every task."""

from __future__ import annotations

import torch

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

    def __call__(self, weights: dict[str, torch.Tensor]) -> list[float]:
        """Accuracy (fraction) on every task's test set, seen or not (unseen ones give FWT)."""
        self.model.load_state_dict(weights)
        return [accuracy(self.model, self.scenario.test_data(t), self.device)[0] for t in range(self.scenario.num_tasks)]
