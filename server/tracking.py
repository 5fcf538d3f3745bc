"""Experiment tracking with the field's tools: ``--track tensorboard``, ``--track mlflow`` (or both).

Each round logs, at the round's number as step: the global model's accuracy per task and on
the tasks seen so far, the mean training loss, replies accepted and rejected, drift events
(in all, and per client under ``drift/<node>`` for the first ``MAX_CLIENT_SERIES`` clients that
report one), the round's wall time, bytes moved (the model down and its update up per accepted
reply) and the released model version. The run's settings are logged as parameters (MLflow)
or as a text summary (TensorBoard); at the end the summary's figures, and with MLflow the final
model and ``summary.json`` as artifacts.

Where to: TensorBoard event files in ``RUN_DIR/tensorboard``; MLflow in a SQLite store
``RUN_DIR/mlflow.db`` with artifacts in ``RUN_DIR/mlartifacts``, or the tracking server or store
``--track-uri`` names; experiment ``fedtide``, one MLflow run per process that runs rounds (a
resumed run goes on in a new one, its steps numbered by round). Both are optional extras (``pip install "fedtide[track]"``); a missing one is named
before the first round. MLflow's store is set up once, when the run starts (seconds, reported
in the summary as ``tracking_setup_seconds``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Any

from common.errors import FedtideError
from server.history import RoundRecord

TRACKERS = ("tensorboard", "mlflow")
INSTALL = 'pip install "fedtide[track]"'
MAX_CLIENT_SERIES = 100  # per-client drift series: beyond this many clients, only the total
EXPERIMENT = "fedtide"


def parse_trackers(value: str) -> tuple[str, ...]:
    """``tensorboard``, ``mlflow``, both comma-separated, or '' (none)."""
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise FedtideError(f"--track {unknown[0][:30]}: use tensorboard, mlflow or tensorboard,mlflow")
    return names


def _metric_name(text: str) -> str:
    """A name both tools accept: letters, digits and ``_-./`` only."""
    return re.sub(r"[^A-Za-z0-9_\-./]", "_", text)[:200]


class RoundMetrics:
    """The figures of one round, as both trackers log them."""

    def __init__(self, model_bytes: int) -> None:
        self.model_bytes = model_bytes
        self.clients: dict[str, str] = {}  # node -> its series name, for the first MAX_CLIENT_SERIES

    def __call__(self, record: RoundRecord) -> dict[str, float]:
        line = record.as_json()
        metrics = {f"accuracy/task_{t}": a for t, a in enumerate(record.task_accuracies)}
        metrics.update({
            "accuracy/seen_tasks": line["accuracy_seen_tasks"], "replies/accepted": len(record.clients),
            "replies/rejected": len(record.rejected), "round_seconds": record.seconds,
            "drift/events": sum(1 for c in record.clients if c.get("drift-detected")),
            "bytes": 2 * self.model_bytes * len(record.clients), "task": record.task,
        })
        if "train-loss" in record.train:
            metrics["loss/train"] = record.train["train-loss"]
        if record.release.get("released") is not None:
            metrics["released_version"] = record.release["released"]
        if record.epsilon is not None:
            metrics["privacy/epsilon"] = record.epsilon
        for client in record.clients:
            if not client.get("drift-detected"):
                continue
            node = str(client.get("name") or client.get("node"))
            if node not in self.clients and len(self.clients) < MAX_CLIENT_SERIES:
                self.clients[node] = _metric_name(f"drift/{node}")
            if node in self.clients:
                metrics[self.clients[node]] = 1.0
        return metrics


class TensorBoardTracker:
    def __init__(self, folder: Path, settings: dict[str, Any], figures: RoundMetrics) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise FedtideError(f"--track tensorboard needs tensorboard: {INSTALL}")
        from torch.utils.tensorboard import SummaryWriter

        self.figures = figures
        self.writer = SummaryWriter(log_dir=str(folder))
        rows = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in sorted(settings.items()))
        self.writer.add_text("settings", "| setting | value |\n|---|---|\n" + rows, 0)

    def round_done(self, record: RoundRecord, connected: int | None) -> None:
        for name, value in self.figures(record).items():
            self.writer.add_scalar(name, value, record.server_round)
        self.writer.flush()

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        for name in ("acc", "bwt", "fwt", "forgetting", "final_prequential_acc", "served_acc"):
            if isinstance(summary.get(name), (int, float)):
                self.writer.add_scalar(f"summary/{name}", summary[name], summary.get("rounds", 0))

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, uri: str, run_dir: Path, settings: dict[str, Any], figures: RoundMetrics) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise FedtideError(f"--track mlflow needs mlflow: {INSTALL}")
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        import os

        # MLflow retries an unreachable server for minutes by default: a wrong URI should fail fast
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        for noisy in ("alembic", "mlflow"):  # store migrations and notices: the run's own log stays readable
            logging.getLogger(noisy).setLevel(logging.WARNING)
        started = time.perf_counter()
        self.figures = figures
        local = not uri
        uri = uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(
                EXPERIMENT, artifact_location=(run_dir / "mlartifacts").resolve().as_uri() if local else None)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(settings.items())]
            for start in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        except Exception as err:  # a tracking URI that cannot be reached is the user's to fix
            raise FedtideError(f"--track mlflow: the tracking store {uri[:120]} cannot be used ({str(err)[:160]}): "
                               "check --track-uri") from None
        self.setup_seconds = time.perf_counter() - started
        self.uri = uri

    def round_done(self, record: RoundRecord, connected: int | None) -> None:
        import mlflow

        stamp = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(_metric_name(k), float(v), stamp, record.server_round)
                   for k, v in self.figures(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        for name in ("acc", "bwt", "fwt", "forgetting", "final_prequential_acc", "served_acc"):
            if isinstance(summary.get(name), (int, float)):
                self.client.log_metric(self.run_id, f"summary/{name}", float(summary[name]))
        for name in ("summary.json", "model.safetensors", "accuracy.svg"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))

    def close(self) -> None:
        import sys

        failed = sys.exc_info()[0] is not None  # closed while an error unwinds the run
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def start_trackers(names: tuple[str, ...], uri: str, run_dir: Path, settings: dict[str, Any],
                   model_bytes: int) -> list[Any]:
    """The trackers ``names`` asks for, started (``uri``: MLflow's tracking URI, '' for the run
    folder's own store); FedtideError when one cannot start."""
    figures = RoundMetrics(model_bytes)
    trackers: list[Any] = []
    try:
        for name in names:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir / "tensorboard", settings, figures))
            else:
                trackers.append(MlflowTracker(uri, run_dir, settings, figures))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers
