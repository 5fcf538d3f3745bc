"""The command line a user types: errors are one line with exit code 2; a run leaves its folder."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig
from fedtide.cli import main

FAST = ["--rounds-per-task", "1", "--local-epochs", "1", "--quiet"]


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--method", "magic"], "unknown method 'magic'"),
        (["--method", "naive+replay"], "cannot be combined"),
        (["--rounds-per-task", "-1"], "--rounds-per-task must be a positive integer"),
        (["--alpha", "0"], "--alpha must be > 0"),
        (["--alpha", "-2"], "--alpha must be > 0"),
        (["--method", "ewc", "--memory-size", "100"], "does not use it"),
        (["--strategy", "fedprox"], "--prox-mu"),
        (["--hidden", "12,x"], "positive layer widths"),
        (["--fraction-train", "1.5"], "in (0, 1]"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(flags, words, tmp_path, capsys):
    code = main(["simulate", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert words in err
    assert err.startswith("fedtide: error:") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_unwritable_out_dir_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["simulate", "--out", str(blocker / "run"), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot write the run folder" in err and "--out" in err


def test_simulate_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), "--method", "replay+ewc", "--prox-mu", "0.01", *FAST]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "accuracy_matrix.csv", "model.safetensors", "accuracy.svg"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "replay+ewc" and config["prox-mu"] == 0.01
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5  # 5 tasks x 1 round
    first = json.loads(lines[0])
    assert first["round"] == 1 and len(first["clients"]) == 5
    assert all("prequential-acc" in c and "task-id" in c for c in first["clients"])
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["accuracy_matrix"]) == 5
    assert 0 <= summary["acc"] <= 1


def test_pyproject_run_config_matches_the_defaults():
    """`flwr run .` and `fedtide simulate` must mean the same run when given no settings."""
    pyproject = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    from_flower = RunConfig.from_mapping(app_config, toml=True)
    assert from_flower.replace(quiet=False) == RunConfig()
    assert set(app_config) == set(RunConfig().to_mapping())  # every setting, the methods' too (from the registry)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fedadam"])
def test_every_strategy_runs_and_clients_can_evaluate(strategy, tmp_path):
    out = tmp_path / strategy
    flags = ["--strategy", strategy, "--fraction-evaluate", "1", "--num-tasks", "2", "--iid"]
    if strategy == "fedprox":
        flags += ["--prox-mu", "0.01"]
    assert main(["simulate", "--out", str(out), *flags, *FAST]) == 0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2
    assert all(0 <= r["client_evaluation"]["eval-acc"] <= 1 for r in rounds)
    assert json.loads((out / "summary.json").read_text())["rejected_replies"] == 0


def test_a_preset_memory_size_does_not_block_methods_without_memory(tmp_path):
    out = tmp_path / "run"
    assert main(["simulate", "--preset", "split-digits", "--method", "naive", "--out", str(out), *FAST]) == 0
    assert json.loads((out / "config.json").read_text())["method"] == "naive"


def test_the_command_exits_quickly_with_everything_written_and_printed(tmp_path):
    """``fedtide`` skips the interpreter's teardown: its output, files and exit code must
    still be complete, through a pipe as in a shell pipeline."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedtide.cli", "simulate", "--out", str(out), "--rounds-per-task", "1",
               "--local-epochs", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "run folder" in done.stderr and done.stderr.endswith("┘\n")  # the summary table got out whole
    assert (out / "accuracy.svg").stat().st_size > 0 and json.loads((out / "summary.json").read_text())["acc"] >= 0
    failed = subprocess.run([*command, "--alpha", "0"], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and failed.stderr.startswith("fedtide: error: --alpha must be > 0")
