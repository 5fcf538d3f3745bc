"""The folder a run leaves behind for a person: config, per-round metrics, summary,
accuracy matrix, final model and a plot."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from common.files import append_synced, ensure_writable_folder, save_tensors_atomic, write_json_atomic, write_text_atomic
from server.history import NodeRejects, RoundRecord, RunHistory
from server.plots import plot_task_accuracy

NODE_REJECTS_FILE = "node_rejects.json"


def default_run_dir(config: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.data.scenario}-{config.methods.method}-s{config.seed}"


class RunFolder:
    """Creates the folder up front (failing early if it cannot be written) and fills it."""

    def __init__(self, path: Path, resume: bool = False) -> None:
        """A new run starts metrics.jsonl empty; a resumed one keeps it (``rewrite_metrics``
        then makes it match the checkpoint)."""
        self.path = ensure_writable_folder(path)
        self._metrics = self.path / "metrics.jsonl"
        self._node_rejects = NodeRejects()
        if not resume:
            self._metrics.write_text("")

    @classmethod
    def for_config(cls, config: RunConfig) -> "RunFolder":
        return cls(Path(config.run.out) if config.run.out else default_run_dir(config))

    def write_config(self, config: RunConfig) -> None:
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


def _matrix_csv(matrix: list[list[float]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    width = len(matrix[0]) if matrix else 0
    writer.writerow(["after_task"] + [f"task_{j}" for j in range(width)])
    for i, row in enumerate(matrix):
        writer.writerow([i] + [f"{v:.4f}" for v in row])
    return out.getvalue()
