"""The public API people use in their own Flower apps, and what a client is sent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedtide
from common.config import RunConfig
from common.scenarios import build_scenario
from server.federation import client_config


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32)[:, None], bunch.target


def test_the_continual_learner_trains_keeps_its_memory_on_disk_and_refuses_bad_samples(tmp_path):
    x, y = _digits()
    settings = {"method": "replay", "memory-size": 50, "local-epochs": 2, "hidden": "32"}
    learner = fedtide.ContinualLearner(settings, input_shape=(1, 8, 8), num_classes=10, state_dir=tmp_path)
    weights = learner.initial_weights()
    before = learner.evaluate(weights, x, y)["eval-acc"]
    first = learner.train(weights, x[y < 2], y[y < 2], server_round=1)
    assert first.metrics["num-examples"] == int((y < 2).sum()) and 0 <= first.metrics["prequential-acc"] <= 1
    assert learner.evaluate(first.weights, x[y < 2], y[y < 2])["eval-acc"] > max(before, 0.9)
    again = fedtide.ContinualLearner(settings, input_shape=(1, 8, 8), num_classes=10, state_dir=tmp_path)
    # a restarted device keeps its memory (the running task's samples wait in replay's stage)
    assert torch.equal(again.state["replay.stage.x"], learner.state["replay.stage.x"])
    memory_only = again.train(first.weights, None, None, server_round=2)  # nothing new: the memory alone
    assert memory_only.metrics["new-examples"] == 0 and memory_only.metrics["num-examples"] == 50
    with pytest.raises(fedtide.FedtideError, match="label"):
        learner.train(weights, x[:4], np.array([0, 1, 2, 11]), server_round=3)
    with pytest.raises(fedtide.FedtideError, match="NaN"):
        learner.train(weights, np.full((2, 1, 8, 8), np.nan, dtype=np.float32), [0, 1], server_round=3)
    with pytest.raises(fedtide.FedtideError, match="outside"):
        learner.train(weights, np.full((2, 1, 8, 8), 1e30, dtype=np.float32), [0, 1], server_round=3)
    standardised = (x - x.mean()) / x.std()  # outside [0, 1]: a learner told so takes them
    wide = fedtide.ContinualLearner(settings, input_shape=(1, 8, 8), num_classes=10, feature_range=(-5, 5))
    assert wide.train(weights, standardised[:20], y[:20], server_round=1).metrics["num-examples"] == 20
    with pytest.raises(fedtide.FedtideError, match="unknown setting|unknown method"):
        fedtide.ContinualLearner({"method": "nope"}, input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(fedtide.FedtideError, match="feature_range"):
        fedtide.ContinualLearner(settings, input_shape=(1, 8, 8), num_classes=10, feature_range=(1, float("nan")))


def test_a_client_is_sent_its_own_settings_only_with_their_digest():
    config = RunConfig.of(aggregation="clip", clip_norm=3.0, round_timeout=60.0, attack="noise", attackers=1,
                          method="der", memory_size=64)
    record = client_config(config, build_scenario(config.data, config.seed))
    assert "clip-norm" not in record and "round-timeout" not in record and "attack" not in record
    assert record["method"] == "der" and record["memory-size"] == 64 and record["lr"] == config.learner.lr
    from common.config import ClientSettings

    assert ClientSettings.from_mapping(dict(record)) == config.client
    assert record["settings-hash"] == config.client.digest()
    assert config.replace(clip_norm=4.0).client.digest() == config.client.digest()  # server-only: same digest
    assert config.replace(lr=0.05).client.digest() != config.client.digest()


def test_the_public_names_load_on_first_use():
    assert set(fedtide.__all__) >= {"ContinualLearner", "FedtideStrategy", "build_strategy", "ServerSettings"}
    strategy = fedtide.build_strategy(fedtide.ServerSettings(aggregation="median"), min_nodes=3)
    assert isinstance(strategy, fedtide.FedtideStrategy) and strategy.rule.name == "median"
    with pytest.raises(AttributeError):
        fedtide.not_a_name  # noqa: B018
