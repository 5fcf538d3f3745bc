"""A round's clients trained together (client.vectorized) give what each gives trained alone
(client.rounds.train_round): every vectorised method and combination, the MLP and the CNN,
clients with unequal data, over task changes, to float rounding."""

import pytest
import torch

from client.rounds import train_round
from client.vectorized import can_vectorize, train_rounds_together
from common.config import RunConfig
from common.models import build_model
from common.scenarios import build_scenario

CLIENTS = 3


def _config(**settings) -> RunConfig:
    base = dict(dataset="digits", scenario="class-incremental", num_tasks=3, rounds_per_task=1, clients=CLIENTS,
                alpha=1.0, memory_size=40, local_epochs=1, batch_size=16, lr=0.05, hidden="32", seed=3)
    return RunConfig.of(**{**base, **settings})


def _mean(outcomes) -> dict[str, torch.Tensor]:
    total = sum(o.metrics["num-examples"] for o in outcomes)
    return {n: sum(o.weights[n] * o.metrics["num-examples"] for o in outcomes) / total for n in outcomes[0].weights}


def _assert_same(alone, together, atol):
    for a, b in zip(alone, together, strict=True):
        for name in a.weights:
            assert torch.allclose(a.weights[name], b.weights[name], atol=atol), (name, (a.weights[name] - b.weights[name]).abs().max())
        assert a.metrics["prequential-acc"] == b.metrics["prequential-acc"]
        assert a.metrics["train-loss"] == pytest.approx(b.metrics["train-loss"], rel=1e-4, abs=1e-6)
        assert a.metrics["num-examples"] == b.metrics["num-examples"]
        assert set(a.state) == set(b.state)
        for key in a.state:
            if a.state[key].is_floating_point():
                assert torch.allclose(a.state[key], b.state[key], atol=atol), key
            else:
                assert torch.equal(a.state[key], b.state[key]), key


def _rounds(config: RunConfig, rounds: int, atol: float = 2e-5) -> list[set[float]]:
    """Train ``rounds`` rounds both ways and compare; each round's learning rates."""
    scenario = build_scenario(config.data, config.seed)
    assert len({len(scenario.train_data(p, 0)) for p in range(CLIENTS)}) > 1  # unequal data: ragged lockstep
    weights = build_model(config.network.model, scenario.input_shape, scenario.num_classes,
                          config.network.hidden_widths, 0).state_dict()
    states_alone = [{} for _ in range(CLIENTS)]
    states_together = [{} for _ in range(CLIENTS)]
    rates = []
    for server_round in range(1, rounds + 1):
        alone = [train_round(config, p, server_round, weights, states_alone[p]) for p in range(CLIENTS)]
        together = train_rounds_together(config, [(p, server_round, states_together[p]) for p in range(CLIENTS)], weights)
        assert together is not None
        _assert_same(alone, together, atol)
        states_alone = [o.state for o in alone]
        states_together = [o.state for o in together]
        weights = _mean(alone)  # both paths go on from the same global model
        rates.append({o.metrics["lr"] for o in alone})
    return rates


@pytest.mark.parametrize("settings", [
    dict(method="naive"),
    dict(method="replay"),
    dict(method="replay", replay_loss="ace", replay_shift=1),
    dict(method="replay", memory_fill="stream", memory_policy="reservoir", replay_ratio=0.5),
    dict(method="der", replay_shift=1),
    dict(method="ewc"),
    dict(method="lwf"),
    dict(method="mas"),
    dict(method="naive", prox_mu=0.1),
    dict(method="der+ewc+lwf", prox_mu=0.05, drift_detector="adwin"),
], ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_methods_trained_together_match_one_by_one(settings):
    _rounds(_config(**settings), rounds=4)


def test_cnn_trained_together_matches_one_by_one():
    _rounds(_config(model="cnn", method="replay+lwf", hidden="16"), rounds=3, atol=5e-5)


@pytest.mark.parametrize("method", ["replay", "der"])
def test_several_epochs_and_learning_rate_schedules_match(method):
    _rounds(_config(method=method, replay_loss="ace", local_epochs=2, lr_schedule="restart", rounds_per_task=2),
            rounds=4)


@pytest.mark.parametrize("method", ["der", "ewc", "mas"])  # ewc and mas cap their pull at 1 / the client's rate
def test_clients_at_different_learning_rates_match(method):  # a client that found drift trains faster next round
    rates = _rounds(_config(method=method, drift_detector="adwin", react_lr_boost=3.0, rounds_per_task=2), rounds=5)
    assert any(len(r) > 1 for r in rates)


def test_a_saved_state_of_other_settings_trains_alike_on_both_paths():
    """An EWC state whose Fisher and anchor do not fit this model (a run of other settings, or a
    tampered file): both paths skip the pull, neither crashes."""
    config = _config(method="ewc")
    scenario = build_scenario(config.data, config.seed)
    weights = build_model("mlp", scenario.input_shape, scenario.num_classes, config.network.hidden_widths, 0).state_dict()
    odd = {"meta.last-task": torch.tensor(1), "ewc.fisher.head.weight": torch.full((3, 3), float("nan")),
           "ewc.anchor.head.weight": torch.zeros(3, 3), "ewc.fisher.head.bias": torch.ones(10)}
    alone = [train_round(config, p, 2, weights, dict(odd)) for p in range(CLIENTS)]
    together = train_rounds_together(config, [(p, 2, dict(odd)) for p in range(CLIENTS)], weights)
    assert together is not None
    for a, b in zip(alone, together):
        for name in a.weights:
            assert torch.isfinite(b.weights[name]).all()
            assert torch.allclose(a.weights[name], b.weights[name], atol=2e-5)


def test_what_cannot_share_a_computation_is_left_to_the_one_client_path():
    for settings in (dict(method="si"), dict(method="replay", optimizer="adam"), dict(method="replay", dp="sample"),
                     dict(method="replay", react_extra_epochs=1)):
        config = _config(**settings)
        assert not can_vectorize(config)
        scenario = build_scenario(config.data, config.seed)
        weights = build_model("mlp", scenario.input_shape, scenario.num_classes, config.network.hidden_widths, 0).state_dict()
        assert train_rounds_together(config, [(0, 1, {}), (1, 1, {})], weights) is None
