"""``ContinualLearner``: fedtide's continual-learning client for your own ClientApp.

You bring the data as it arrives, each round; the learner trains the server's weights on it
with the continual-learning methods you chose (replay, der, ewc, lwf, a proximal term),
watches the stream for drift (a drift is a task boundary: the methods consolidate there) and
keeps its state (memory, Fisher, teacher, detector) on disk, so a restarted device goes on
where it stopped. It is what ``fedtide client`` runs on its inbox files::

    learner = ContinualLearner({"method": "replay", "memory-size": 300}, input_shape=(1, 28, 28),
                               num_classes=10, state_dir="state/")
    outcome = learner.train(global_weights, x, y, server_round)   # torch tensors or numpy arrays
    reply_arrays, reply_metrics = outcome.weights, outcome.metrics  # metrics hold num-examples

Settings are flat kebab-case names, as ``fedtide simulate`` takes them (``lr``,
``local-epochs``, ``method``, ``drift-detector``...); bad ones raise ``FedtideError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.edge import learn_round
from client.feature_range import DEFAULT_FEATURE_RANGE, parse_feature_range
from client.inbox import BadFile, validate_samples
from client.rounds import TrainOutcome, load_global
from client.state_store import ClientStateStore
from common.config import ClientSettings
from common.devices import resolve_device
from common.errors import FedtideError
from common.evaluation import accuracy
from common.models import build_model


class ContinualLearner:
    """One device's learner (see the module docstring). ``state_dir`` None keeps the state in
    this object only; ``node_id`` gives each device its own random draws; ``feature_range``:
    the (low, high) float values a sample may hold (default [0, 1], as fedtide's datasets and
    uint8 pixels / 255; widen it for standardised features, e.g. (-5, 5))."""

    def __init__(
        self,
        settings: ClientSettings | Mapping[str, Any] | None = None,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        state_dir: str | Path | None = None,
        node_id: int = 0,
        device: str | None = None,
        feature_range: tuple[float, float] = DEFAULT_FEATURE_RANGE,
    ) -> None:
        self.settings = (settings if isinstance(settings, ClientSettings)
                         else ClientSettings.from_mapping(settings or {}, strict=True))
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.node_id = node_id
        self.device = device
        self.feature_range = parse_feature_range(",".join(str(float(v)) for v in feature_range), "feature_range")
        self._store = ClientStateStore(Path(state_dir)) if state_dir is not None else None
        self.state: dict[str, torch.Tensor] = {}
        self._ledger: list[dict] = []  # what fedtide client records of its inbox files; kept as found
        if self._store is not None:
            self.state, self._ledger = self._store.load()

    def train(self, weights: Mapping[str, torch.Tensor], x: Any, y: Any, server_round: int) -> TrainOutcome:
        """Train ``weights`` (the server's model, by parameter name) on this round's new
        samples ``x`` ``[N, *input_shape]`` and labels ``y`` ``[N]`` (None, None: on the memory
        alone). Returns the weights to send back, the metrics (``num-examples``, ``train-loss``,
        ``prequential-acc``, ``drift-detected``...) and the new state, already saved."""
        data = None if x is None else self._samples(x, y)
        outcome = learn_round(self.settings, self.input_shape, self.num_classes, server_round, dict(weights),
                              self.state, data, self.device, self.node_id)
        if outcome is None:
            raise FedtideError("nothing to train on: give samples (x, y), or keep a replay memory (--method replay)")
        self.state = outcome.state
        if self._store is not None:
            self._store.save(self.state, self._ledger)
        return outcome

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """A fresh model of these settings (seeded by ``seed``): what a server starts from."""
        model = build_model(self.settings.network.model, self.input_shape, self.num_classes,
                            self.settings.network.hidden_widths, self.settings.seed)
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}

    def evaluate(self, weights: Mapping[str, torch.Tensor], x: Any, y: Any) -> dict[str, float]:
        """Accuracy and mean loss of ``weights`` on ``x``, ``y``, with ``num-examples``."""
        data = self._samples(x, y)
        device = resolve_device(self.device or self.settings.learner.device)
        model = load_global(self.settings, self.input_shape, self.num_classes, dict(weights)).to(device)
        acc, loss = accuracy(model, data, device)
        return {"num-examples": len(data), "eval-acc": acc, "eval-loss": loss}

    def _samples(self, x: Any, y: Any):
        as_numpy = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in (x, y)]
        try:
            return validate_samples(as_numpy[0], as_numpy[1], self.input_shape, self.num_classes, self.feature_range)
        except BadFile as err:
            raise FedtideError(f"these samples cannot be trained on: {err}") from None
