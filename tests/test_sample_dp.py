"""Sample-level differential privacy (--dp sample): DP-SGD on each client with Opacus, each
sample's gradient clipped, memories paying at every step, the budget kept on the device and
reported, a client stopping at its target, and what cannot work refused."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import RDPAccountant

from client.dp_sgd import STEPS_KEY, LinearSteps, SampleBudget, planned_steps, step_rate, train_local_dp
from client.learner import LocalTraining
from client.methods.replay import Replay
from common.config import RunConfig
from common.datasets import LabelledSplit
from common.errors import FedtideError
from common.models import SmallCNN
from fedtide.cli import main
from server.reply_metrics import ReplyMetrics


def _data(n: int, seed: int = 0) -> LabelledSplit:
    g = torch.Generator().manual_seed(seed)
    return LabelledSplit(torch.randn(n, 20, generator=g), torch.randint(0, 4, (n,), generator=g))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("per_sample", ["auto", "opacus"])
def test_one_step_moves_the_model_by_at_most_the_clipped_gradient_whatever_the_data(per_sample):
    """A step over all the data (rate 1) with no noise: the mean of gradients each clipped to
    C moves the weights by at most lr * C, however wild the samples are."""
    model = _model()
    before = _flat(model)
    wild = LabelledSplit(_data(16).x * 1e4, _data(16).y)
    train_local_dp(model, wild, [], LocalTraining(lr=2.0, epochs=1, batch_size=16), noise=0.0, clip=0.1, seed=0,
                   budget=SampleBudget(), generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                   per_sample=per_sample)
    moved = float((_flat(model) - before).norm())
    assert 0 < moved <= 2.0 * 0.1 + 1e-5
    plain = _model()
    torch.nn.functional.cross_entropy(plain(wild.x), wild.y).backward()
    assert 2.0 * float(torch.cat([p.grad.flatten() for p in plain.parameters()]).norm()) > 100 * moved


def _private_weights(model: torch.nn.Module, per_sample: str, noise: float, x_shape=(20,)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    data = LabelledSplit(torch.rand(120, *x_shape, generator=g), torch.randint(0, 4, (120,), generator=g))
    replay = Replay(capacity=30, seed=0, fill="stream")
    replay.observe(data.x[:30], data.y[:30])
    train_local_dp(model, data, [replay], LocalTraining(lr=0.5, epochs=2, batch_size=16), noise=noise, clip=0.5,
                   seed=3, budget=SampleBudget(), generator=torch.Generator().manual_seed(1),
                   device=torch.device("cpu"), per_sample=per_sample)
    return _flat(model)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_the_mlps_ghost_clipping_gives_opacus_numbers_without_per_sample_gradients(noise):
    assert LinearSteps.fits(_model())
    fast, opacus = _private_weights(_model(), "auto", noise), _private_weights(_model(), "opacus", noise)
    assert torch.allclose(fast, opacus, atol=1e-6) and not torch.equal(fast, _flat(_model()))


def test_the_cnn_trains_privately_through_opacus():
    torch.manual_seed(0)
    cnn = SmallCNN((1, 8, 8), 4, (16,))
    assert not LinearSteps.fits(cnn)
    before = _flat(cnn)
    after = _private_weights(cnn, "auto", 1.0, x_shape=(1, 8, 8))
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def test_the_budget_is_opacus_rdp_accountants_over_every_step_and_memories_pay_each_time():
    budget = SampleBudget()
    budget.add(1.1, 0.05, 30)
    budget.add(1.1, 0.2, 30)  # a round with a small memory: its memories are drawn often
    budget.add(1.1, 0.05, 30)  # merges with the first row
    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.05, 60), (1.1, 0.2, 30)]
    assert budget.rows == [(1.1, 0.05, 60), (1.1, 0.2, 30)]
    assert budget.epsilon(1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    restored = SampleBudget.from_state(budget.state())
    assert restored.rows == budget.rows
    # each round replaying the same memory costs again
    assert budget.epsilon(1e-5, (1.1, 0.2, 30)) > budget.epsilon(1e-5)
    # the rate is the worse placed sample's: 200 memories drawn ratio * batch at a time
    training = LocalTraining(lr=0.1, epochs=2, batch_size=32)
    assert step_rate(1200, 200, training, 1.0) == (pytest.approx(32 / 1200), pytest.approx(0.16), pytest.approx(0.16))
    assert step_rate(1200, 0, training, 1.0)[2] == pytest.approx(32 / 1200)
    assert planned_steps(1200, 32, 2) == 76


@pytest.mark.parametrize("damaged", [
    torch.zeros(3),  # not rows of three
    torch.tensor([[1.0, 2.0, 10.0]]),  # a rate above 1
    torch.tensor([[1.0, float("nan"), 10.0]]),
    torch.tensor([[1.0, 0.1, -5.0]]),
])
def test_a_damaged_privacy_history_stops_the_client_instead_of_resetting_its_budget(damaged):
    with pytest.raises(FedtideError, match="budget this device spent is unknown"):
        SampleBudget.from_state({STEPS_KEY: damaged})


def test_memories_join_a_private_batch_by_poisson_sampling_never_twice():
    replay = Replay(capacity=50, seed=0, fill="stream")
    data = _data(50)
    replay.observe(data.x, data.y)
    replay.draw_poisson(0.3, torch.Generator().manual_seed(1))
    sizes = []
    for _ in range(200):
        x, _ = replay.extend_batch(torch.zeros(0, 20), torch.zeros(0, dtype=torch.long))
        if replay._drawn is not None:
            assert len(set(replay._drawn.tolist())) == len(replay._drawn)
        sizes.append(len(x))
    assert 0 in sizes or min(sizes) < 10  # the size varies, as Poisson sampling does
    assert abs(sum(sizes) / len(sizes) - 15) < 1.5
    replay.draw_poisson(None)
    x, _ = replay.extend_batch(torch.zeros(4, 20), torch.zeros(4, dtype=torch.long))
    assert len(x) == 8  # back to ratio * batch drawn with replacement


def test_a_private_run_reports_each_clients_budget_and_keeps_it_on_the_device(tmp_path):
    out = tmp_path / "run"
    code = main(["simulate", "--out", str(out), "--num-tasks", "2", "--rounds-per-task", "2", "--clients", "3",
                 "--dp", "sample", "--dp-noise", "1.0", "--method", "der+lwf", "--threads", "1", "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epsilons = [r["epsilon"] for r in rounds]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    reported = [c["dp-epsilon"] for r in rounds for c in r["clients"]]
    assert max(reported) == pytest.approx(summary["dp"]["epsilon"]) and summary["dp"]["level"] == "sample"
    assert summary["rejected_replies"] == 0 and "memory pays" in summary["dp"]["sampling"]


def test_each_client_stops_before_it_would_pass_its_target_and_so_does_the_run(tmp_path):
    out = tmp_path / "run"
    code = main(["simulate", "--out", str(out), "--num-tasks", "1", "--rounds-per-task", "20", "--clients", "3",
                 "--dp", "sample", "--dp-noise", "1.5", "--target-epsilon", "3", "--method", "replay",
                 "--threads", "1", "--quiet"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 1 < len(rounds) < 20 and summary["stopped_at_round"] == len(rounds)
    assert all(c["dp-epsilon"] <= 3 for r in rounds for c in r["clients"])
    assert all("privacy budget spent" in reject["reason"] for reject in rounds[-1]["rejected"])
    assert summary["dp"]["clients_budget_spent"] >= 3 and summary["dp"]["epsilon"] <= 3


def test_a_client_keeps_its_spent_budget_in_its_state():
    from client.rounds import train_round
    from common.models import build_model
    from common.scenarios import build_scenario

    config = RunConfig.of(num_tasks=1, rounds_per_task=3, clients=2, dp="sample", method="replay").client
    scenario = build_scenario(config.data, config.seed)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes,
                        config.network.hidden_widths, config.seed)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    first = train_round(config, 0, 1, weights, {})
    assert STEPS_KEY in first.state and first.metrics["dp-epsilon"] > 0
    second = train_round(config, 0, 2, weights, first.state)
    assert second.metrics["dp-epsilon"] > first.metrics["dp-epsilon"]  # composed, never reset
    assert train_round(config, 0, 2, weights, {}).metrics["dp-epsilon"] < second.metrics["dp-epsilon"]


@pytest.mark.parametrize("metrics, reason", [
    ({"dp-epsilon": float("nan")}, "dp-epsilon"),
    ({"dp-epsilon": -1.0}, "dp-epsilon"),
    ({"dp-epsilon": 1e300}, "dp-epsilon"),
    ({"dp-spent": 1}, "privacy budget spent"),
    ({"dp-spent": 7}, "dp-spent"),
])
def test_a_reply_with_a_bad_or_spent_budget_is_dropped_with_its_reason(metrics, reason):
    verdict = ReplyMetrics(max_num_examples=1000).clean({"num-examples": 10, **metrics})
    assert verdict.reason is not None and reason in verdict.reason


@pytest.mark.parametrize("settings, flag", [
    ({"method": "ewc"}, "--method ewc"),
    ({"method": "replay+si"}, "--method si"),
    ({"method": "replay", "prox_mu": 0.01}, "--prox-mu"),
    ({"training": "local-only"}, "--training local-only"),
    ({"method": "replay", "memory_fill": "stream"}, "--memory-fill boundary"),
    ({"method": "dgr"}, "--method dgr"),
    ({"method": "replay", "replay_loss": "ace"}, "--replay-loss ce"),
    ({"method": "replay", "react_extra_epochs": 1}, "--react-extra-epochs"),
    ({"method": "replay", "lr_schedule": "plateau"}, "--lr-schedule plateau"),
    ({"method": "replay", "target_epsilon": 5.0, "buffer_size": 2, "concurrency": 4}, "--buffer-size"),
    ({"method": "replay", "dp_noise": 0.01}, "dp-noise"),
])
def test_what_dp_sgd_cannot_go_with_is_refused_in_one_line(settings, flag):
    with pytest.raises(FedtideError, match=flag) as refused:
        RunConfig.of(dp="sample", **settings)
    assert "\n" not in str(refused.value)


def _edge_round(state_dir, inbox, server_round, run_uid):
    from client.edge import train_on_arrivals
    from common.models import build_model
    from common.receipt import Receipt

    config = RunConfig.of(dp="sample", method="replay").client
    weights = build_model(config.network.model, (1, 8, 8), 10, config.network.hidden_widths, config.seed).state_dict()
    return train_on_arrivals(config, (1, 8, 8), 10, server_round, weights, inbox, state_dir,
                             receipt=Receipt(run_uid, server_round - 1))


def test_a_devices_budget_counts_on_when_a_new_run_starts_its_state_fresh(tmp_path):
    import numpy as np

    from client.privacy_ledger import LEDGER_FILE

    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    np.savez(inbox / "a.npz", x=rng.uniform(0, 1, (64, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 64))
    first = _edge_round(state, inbox, 1, "a" * 32).metrics["dp-epsilon"]
    second = _edge_round(state, inbox, 2, "a" * 32).metrics["dp-epsilon"]
    # a new server run: the state goes aside and the file is new again, its samples trained on again
    again = _edge_round(state, inbox, 1, "b" * 32)
    assert again.metrics["new-files"] == 1 and 0 < first < second < again.metrics["dp-epsilon"]
    (state / LEDGER_FILE).write_text((state / LEDGER_FILE).read_text().replace("1.0", "0.5", 1))
    with pytest.raises(FedtideError, match="privacy ledger .* is damaged.*will not train"):
        _edge_round(state, inbox, 2, "b" * 32)


def test_a_memory_that_is_still_the_rounds_data_is_never_drawn_beside_it():
    from client.dp_sgd import drawable

    data = _data(40)
    replay = Replay(capacity=30, seed=0, fill="stream")
    replay.observe(data.x[:10], data.y[:10])  # a drift mid-task: ten of the task's samples are memories already
    replay.observe(_data(20, seed=1).x, _data(20, seed=1).y)
    allowed, count = drawable(replay, data)
    assert count == 20 and not allowed[:10].any() and allowed[10:].all()
    replay.draw_poisson(1.0, torch.Generator().manual_seed(0), allowed)
    _, y = replay.extend_batch(torch.zeros(0, 20), torch.zeros(0, dtype=torch.long))
    assert len(y) == 20  # rate 1: every allowed memory, none of the ten


def test_a_restored_older_ledger_never_lowers_what_was_spent_and_rates_round_up():
    from client.dp_sgd import rate_up
    from client.privacy_ledger import merge_spent

    ledger = torch.tensor([[1.0, 0.027, 100.0]], dtype=torch.float64)
    state = torch.tensor([[1.0, 0.027, 300.0], [1.0, 0.16, 40.0]], dtype=torch.float64)
    merged = {(n, q): c for n, q, c in merge_spent(ledger, state).tolist()}
    assert merged == {(1.0, 0.027): 300.0, (1.0, 0.16): 40.0}
    assert all(rate_up(q) >= q for q in (32 / 1200, 0.16, 0.0123456, 0.999)) and rate_up(32 / 1200) == 0.027


def test_ders_private_penalty_is_a_sum_of_per_sample_terms_over_the_batch():
    from client.methods.der import DarkReplay

    der = DarkReplay(capacity=8, seed=0, weight=0.5, fill="stream")
    der.observe(_data(8).x, _data(8).y)
    der._label(_model())
    der.draw_poisson(1.0, torch.Generator().manual_seed(0))
    x, y = der.extend_batch(_data(4, seed=2).x, _data(4, seed=2).y)
    logits = _model()(x)
    replayed, target = logits[4:], der.logits[der._drawn]
    expected = 0.5 * ((replayed - target) ** 2).mean(dim=1).sum() / len(x)
    assert torch.allclose(der.penalty(_model(), x, logits), expected)


def test_the_server_aggregates_only_replies_that_say_their_epsilon_and_drops_spent_ones():
    import numpy as np

    from common.schedule import TaskSchedule
    from reply_fuzz import _honest, _record, run_fuzz
    from server.history import RunHistory
    from server.strategy import run_strategy

    rng = np.random.default_rng(0)
    global_arrays = {"w": rng.normal(size=(6, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    replies = [_record(_honest(global_arrays, rng), {"num-examples": 10, "dp-epsilon": 2.5}),
               _record(_honest(global_arrays, rng), {"num-examples": 10}),  # no DP-SGD behind it
               _record(_honest(global_arrays, rng), {"num-examples": 10, "dp-epsilon": 9.0, "dp-spent": 1})]
    history = RunHistory(TaskSchedule.build(num_tasks=1, rounds_per_task=2, clients=3, spread=0, seed=0))
    result = run_fuzz(run_strategy(RunConfig.of(clients=3, dp="sample"), history), global_arrays, replies, per_round=3)
    assert (result.crashes, result.accepted) == (0, 1), result.errors
    reasons = [r["reason"] for r in history.rounds[0].rejected]
    assert any("reports no dp-epsilon" in r for r in reasons) and any("privacy budget spent" in r for r in reasons)
    assert history.rounds[0].epsilon == 2.5
