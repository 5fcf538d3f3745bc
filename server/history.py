"""What happened in a run, round by round: the source of metrics.jsonl, the matrix and the plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.scenarios import task_of_round


@dataclass
class RoundRecord:
    server_round: int
    task: int
    task_accuracies: list[float]
    train: dict[str, float] = field(default_factory=dict)
    client_evaluation: dict[str, float] = field(default_factory=dict)
    clients: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        seen = self.task_accuracies[: self.task + 1]
        return {
            "round": self.server_round,
            "task": self.task,
            "accuracy_seen_tasks": sum(seen) / len(seen),
            "task_accuracies": self.task_accuracies,
            "train": self.train,
            "client_evaluation": self.client_evaluation,
            "clients": self.clients,
            "rejected": self.rejected,
            "seconds": self.seconds,
        }


class RunHistory:
    """Collects per-round figures; the accuracy matrix row i is taken after task i's last round."""

    def __init__(self, num_tasks: int, rounds_per_task: int) -> None:
        self.num_tasks = num_tasks
        self.rounds_per_task = rounds_per_task
        self.baseline: list[float] = []
        self.rounds: list[RoundRecord] = []
        self._pending_clients: list[dict[str, Any]] = []
        self._pending_rejects: list[dict[str, Any]] = []
        self._pending_train: dict[str, float] = {}
        self._pending_evaluation: dict[str, float] = {}


    # called from the strategy while a round is aggregated
    def client_reply(self, node_id: int, metrics: dict[str, Any]) -> None:
        self._pending_clients.append({"node": node_id, **metrics})

    def rejected_reply(self, server_round: int, node_id: int, reason: str) -> None:
        self._pending_rejects.append({"round": server_round, "node": node_id, "reason": reason})

    def train_metrics(self, metrics: dict[str, float]) -> None:
        self._pending_train = dict(metrics)

    def evaluate_metrics(self, metrics: dict[str, float]) -> None:
        self._pending_evaluation = dict(metrics)

    # called after the global model was evaluated
    def close_round(self, server_round: int, task_accuracies: list[float], seconds: float) -> RoundRecord | None:
        if server_round == 0:
            self.baseline = list(task_accuracies)
            return None
        record = RoundRecord(
            server_round=server_round,
            task=task_of_round(server_round, self.rounds_per_task, self.num_tasks),
            task_accuracies=list(task_accuracies),
            train=self._pending_train,
            client_evaluation=self._pending_evaluation,
            clients=self._pending_clients,
            rejected=self._pending_rejects,
            seconds=seconds,
        )
        self.rounds.append(record)
        self._pending_clients, self._pending_rejects = [], []
        self._pending_train, self._pending_evaluation = {}, {}
        return record

    @property
    def accuracy_matrix(self) -> list[list[float]]:
        """R[i][j]; only rows of finished tasks."""
        by_round = {r.server_round: r for r in self.rounds}
        rows = []
        for task in range(self.num_tasks):
            last = (task + 1) * self.rounds_per_task
            if last in by_round:
                rows.append(by_round[last].task_accuracies)
        return rows

    @property
    def drift_events(self) -> list[dict[str, Any]]:
        """Each client reply that reported a detected drift: round, node, task, stream position."""
        return [
            {"round": r.server_round, "node": c["node"], "task": c.get("task-id"), "position": c.get("drift-position")}
            for r in self.rounds
            for c in r.clients
            if c.get("drift-detected")
        ]

    @property
    def rejects(self) -> list[dict[str, Any]]:
        return [r for record in self.rounds for r in record.rejected]
