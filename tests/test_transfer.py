"""Transfer learning, frozen layers, input transforms and learning-rate schedules."""

import json

import pytest
import torch

from client.lr_schedule import round_lr, update_plateau
from common.config import RunConfig
from common.files import load_tensors
from common.scenarios import build_scenario
from fedtide.cli import main

FAST = ["--rounds-per-task", "1", "--local-epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("source") / "run"
    assert main(["simulate", "--out", str(out), "--method", "naive", *FAST]) == 0
    return out / "model.safetensors"


def test_init_from_a_saved_model_starts_where_it_ended(trained, tmp_path):
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), "--init-from", str(trained), "--method", "naive", *FAST]) == 0
    source = json.loads((trained.parent / "summary.json").read_text())
    baseline = json.loads((out / "summary.json").read_text())["baseline"]
    assert baseline == pytest.approx(source["final_task_accuracies"])  # round 0 = the source's final model


def test_frozen_layers_do_not_move(trained, tmp_path):
    out = tmp_path / "run"
    flags = ["--init-from", str(trained), "--freeze", "features.1", "--method", "replay+ewc", "--prox-mu", "0.01"]
    assert main(["simulate", "--out", str(out), *flags, *FAST]) == 0
    before, after = load_tensors(trained), load_tensors(out / "model.safetensors")
    assert torch.equal(before["features.1.weight"], after["features.1.weight"])
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_init_from_a_model_that_does_not_fit_says_why(trained, tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "r"), "--init-from", str(trained), "--hidden", "64", *FAST]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "--hidden" in err
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not safetensors at all")
    assert main(["simulate", "--out", str(tmp_path / "r2"), "--init-from", str(bogus), *FAST]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_freezing_an_unknown_layer_lists_the_real_ones(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "r"), "--freeze", "encoder", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--freeze encoder" in err and "head.weight" in err


def test_padding_and_standardization_shape_the_inputs():
    scenario = build_scenario(*_scenario_args(RunConfig.of(pad_to=12, normalize=True)))
    x = scenario.train_data(0, 0).x
    assert tuple(x.shape[1:]) == (1, 12, 12)
    assert abs(float(scenario.test_data(0).x.mean())) < 1.0


def test_restart_schedule_starts_high_and_decays_within_a_task():
    lrs = [round_lr(0.1, "restart", k, 5, {}, task_changed=k == 0) for k in range(5)]
    assert lrs[0] == pytest.approx(0.1) and lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.01)


def test_plateau_schedule_halves_after_stalled_rounds_and_resets_at_a_switch():
    state = {"schedule.plateau": update_plateau({}, 1.0, task_changed=True)}
    for _ in range(2):
        state["schedule.plateau"] = update_plateau(state, 1.0, task_changed=False)
    assert round_lr(0.1, "plateau", 3, 5, state, task_changed=False) == pytest.approx(0.05)
    assert round_lr(0.1, "plateau", 0, 5, state, task_changed=True) == pytest.approx(0.1)


def test_schedules_run_end_to_end(tmp_path):
    for schedule in ("restart", "plateau"):
        out = tmp_path / schedule
        assert main(["simulate", "--out", str(out), "--lr-schedule", schedule, "--rounds-per-task", "3",
                     "--local-epochs", "1", "--num-tasks", "2", "--quiet"]) == 0
        lrs = [json.loads(l)["clients"][0]["lr"] for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(set(lrs)) > 1 or schedule == "plateau"


def _scenario_args(config):
    return config.data, config.seed
