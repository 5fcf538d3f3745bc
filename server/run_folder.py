"""The folder a run leaves behind for a person: config, per-round metrics, summary,
accuracy matrix, final model and a plot; which files in it are fedtide's."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from common.errors import FedtideError
from common.files import append_synced, ensure_writable_folder, save_tensors_atomic, write_json_atomic, write_text_atomic
from server.checkpoint import CHECKPOINT_FOLDER, CheckpointStore
from server.history import NodeRejects, RoundRecord, RunHistory
from server.model_registry import MODELS_FOLDER, ModelRegistry
from server.node_names import NODES_FILE
from server.plots import plot_task_accuracy

NODE_REJECTS_FILE = "node_rejects.json"
# what --track writes in the run folder by default (server.tracking): an older run's is removed too
TRACKING_FILES = ("mlflow.db",)
TRACKING_FOLDERS = ("tensorboard", "mlartifacts")
# what a finished run leaves beside config.json and metrics.jsonl; a new run removes an older one's
RESULT_FILES = ("summary.json", "accuracy_matrix.csv", "model.safetensors", "accuracy.svg", "drift_events.jsonl",
                "rejected_replies.jsonl", NODE_REJECTS_FILE)
# every file fedtide writes in a run folder but its lock: the server's SuperLink log, a bench's cell record
RUN_FILES = ("config.json", "metrics.jsonl", *RESULT_FILES, "superlink.log", "cell.json", NODES_FILE)


def default_run_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.data.scenario}-{config.methods.method}-s{config.seed}"


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds a fedtide run, finished or not."""
    path = Path(path)
    return (any((path / name).is_file() for name in RUN_FILES) or bool(CheckpointStore(path).rounds())
            or (path / MODELS_FOLDER).is_dir())


def clear_run(path: Path) -> None:
    """Remove every file fedtide writes in a run folder (checkpoints and journal included, and
    what an interrupted atomic write left), so that nothing of an older run remains; files
    of anyone else stay. Hold the folder's lock (``server.run_lock``) while calling it."""
    path = Path(path)
    checkpoints = path / CHECKPOINT_FOLDER
    CheckpointStore(path).clear()
    ModelRegistry(path).clear()
    _clear_tracking(path)
    leftovers = [p for name in RUN_FILES for p in path.glob(f".{name}.*.tmp")]
    if checkpoints.is_dir():
        leftovers += checkpoints.glob(".*.tmp")
    for file in [*(path / name for name in RUN_FILES), *leftovers]:
        file.unlink(missing_ok=True)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()


def prepare_new_run(path: Path, replace: bool) -> None:
    """Make ``path`` ready for a new run: FedtideError when it holds a run (finished or not)
    unless ``replace``, which removes that run's files (``clear_run``). Hold the folder's lock."""
    if not holds_run(path):
        return
    if not replace:
        raise FedtideError(
            f"--out {path} already holds a run: choose another --out, go on with it with --resume {path}, "
            "or pass --force to replace it (its files are deleted)"
        )
    clear_run(path)


class RunFolder:
    """Creates the folder up front (failing early if it cannot be written) and fills it."""

    def __init__(self, path: Path, resume: bool = False) -> None:
        """Nothing is written until ``start`` (the run then holds the folder's lock)."""
        self.path = ensure_writable_folder(path)
        self.resume = resume
        self._metrics = self.path / "metrics.jsonl"
        self._node_rejects = NodeRejects()

    def start(self, config: RunConfig) -> None:
        """A new run removes the results of an older one in this folder (so that none is
        left beside its own), starts metrics.jsonl empty and writes its config.json; a
        resumed one keeps them (``rewrite_metrics`` then makes metrics.jsonl match the
        checkpoint)."""
        if self.resume:
            return
        for name in RESULT_FILES:
            (self.path / name).unlink(missing_ok=True)
        ModelRegistry(self.path).clear()  # an older run's releases are not this run's
        _clear_tracking(self.path)
        self._metrics.write_text("")
        write_json_atomic(self.path / "config.json", config.to_mapping())

    def rewrite_metrics(self, history: RunHistory) -> None:
        """metrics.jsonl as the history says: the rounds of a checkpoint, no more, no fewer."""
        write_text_atomic(self._metrics, "".join(json.dumps(r.as_json()) + "\n" for r in history.rounds))
        self._node_rejects = history.node_rejects()

    def append_round(self, record: RoundRecord) -> None:
        append_synced(self._metrics, (json.dumps(record.as_json()) + "\n").encode())
        if self._node_rejects.add(record):  # kept current while the run goes on
            write_json_atomic(self.path / NODE_REJECTS_FILE, self._node_rejects.as_json())

    def write_results(
        self, history: RunHistory, summary: dict[str, Any], weights: dict[str, torch.Tensor], config: RunConfig
    ) -> None:
        write_json_atomic(self.path / "summary.json", summary)
        write_text_atomic(self.path / "accuracy_matrix.csv", _matrix_csv(history.accuracy_matrix))
        save_tensors_atomic(
            self.path / "model.safetensors",
            weights,
            metadata={"model": config.network.model, "hidden": config.network.hidden, "dataset": config.data.dataset},
        )
        if history.drift_events:
            write_text_atomic(
                self.path / "drift_events.jsonl", "".join(json.dumps(e) + "\n" for e in history.drift_events)
            )
        if history.rejects:
            write_text_atomic(
                self.path / "rejected_replies.jsonl", "".join(json.dumps(r) + "\n" for r in history.rejects)
            )
            write_json_atomic(self.path / NODE_REJECTS_FILE, history.node_rejects().as_json())
        plot_task_accuracy(history, self.path / "accuracy.svg")


def _clear_tracking(path: Path) -> None:
    import shutil

    for name in TRACKING_FILES:
        (path / name).unlink(missing_ok=True)
    for name in TRACKING_FOLDERS:
        if (path / name).is_dir():
            shutil.rmtree(path / name)


def _matrix_csv(matrix: list[list[float]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    width = len(matrix[0]) if matrix else 0
    writer.writerow(["after_task"] + [f"task_{j}" for j in range(width)])
    for i, row in enumerate(matrix):
        writer.writerow([i] + [f"{v:.4f}" for v in row])
    return out.getvalue()
