"""Experiment tracking: a simulation logged to TensorBoard and MLflow, read back with each
library's own reader (TensorBoard's EventAccumulator, MLflow's client)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.config import RunConfig
from common.errors import FedtideError
from fedtide.cli import main
from fedtide.runtimes.inprocess import run_inprocess


def test_each_round_reaches_tensorboard_and_mlflow_and_reads_back(tmp_path):
    out = tmp_path / "run"
    config = RunConfig.of(num_tasks=2, rounds_per_task=3, hidden="16", quiet=True, out=str(out),
                          track="tensorboard,mlflow")
    summary = run_inprocess(config, threads=1)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    seen = events.Scalars("accuracy/seen_tasks")
    assert [e.step for e in seen] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in seen] == pytest.approx([r["accuracy_seen_tasks"] for r in rounds])
    assert [e.value for e in events.Scalars("replies/accepted")] == [5.0] * 6
    assert "accuracy/task_1" in events.Tags()["scalars"] and "settings/text_summary" in events.Tags()["tensors"]

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedtide")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "accuracy/task_0")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in history] == pytest.approx([r["task_accuracies"][0] for r in rounds])
    assert run.data.params["num-tasks"] == "2" and run.data.params["track"] == "tensorboard,mlflow"
    assert run.data.metrics["summary/acc"] == pytest.approx(summary["acc"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "model.safetensors"}
    assert run.info.status == "FINISHED" and summary["tracking_setup_seconds"] > 0


def test_tracking_settings_that_cannot_work_are_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(FedtideError, match="--track wandb"):
        RunConfig.of(track="wandb")
    with pytest.raises(FedtideError, match="add --track mlflow"):
        RunConfig.of(track="tensorboard", track_uri="sqlite:///x.db")
    code = main(["simulate", "--out", str(tmp_path / "r"), "--num-tasks", "1", "--rounds-per-task", "1", "--quiet",
                 "--track", "mlflow", "--track-uri", "http://127.0.0.1:9/"])  # nothing listens there
    assert code == 2 and "cannot be used" in capsys.readouterr().err
