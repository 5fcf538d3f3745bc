"""What happened in a run, round by round: the source of metrics.jsonl, the matrix and the plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.schedule import TaskSchedule


@dataclass
class RoundRecord:
    server_round: int
    task: int  # the newest task any client trains on in this round
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


    @classmethod
    def from_json(cls, line: dict[str, Any]) -> "RoundRecord":
        """The record ``as_json`` wrote (a line of metrics.jsonl)."""
        return cls(
            server_round=line["round"], task=line["task"], task_accuracies=line["task_accuracies"],
            train=line.get("train", {}), client_evaluation=line.get("client_evaluation", {}),
            clients=line.get("clients", []), rejected=line.get("rejected", []), seconds=line.get("seconds", 0.0),
        )


class RunHistory:
    """Collects per-round figures; accuracy-matrix row i is read at ``schedule.end_round(i)``."""

    def __init__(self, schedule: TaskSchedule) -> None:
        self.schedule = schedule
        self.num_tasks = schedule.num_tasks
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

    def pending_drift_fraction(self) -> float:
        """Share of this round's accepted replies that report a drift."""
        if not self._pending_clients:
            return 0.0
        return sum(1 for c in self._pending_clients if c.get("drift-detected")) / len(self._pending_clients)

    def pending_drifted_nodes(self) -> list[int]:
        """Nodes whose accepted reply this round reported a drift."""
        return [c["node"] for c in self._pending_clients if c.get("drift-detected")]

    # called after the global model was evaluated
    def close_round(self, server_round: int, task_accuracies: list[float], seconds: float) -> RoundRecord | None:
        if server_round == 0:
            self.baseline = list(task_accuracies)
            return None
        record = RoundRecord(
            server_round=server_round,
            task=self.schedule.newest_task(server_round),
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
        return [
            by_round[self.schedule.end_round(t)].task_accuracies
            for t in range(self.num_tasks)
            if self.schedule.end_round(t) in by_round
        ]

    @property
    def drift_events(self) -> list[dict[str, Any]]:
        """Each client reply that reported a detected drift: round, node, task, stream position."""
        return [
            {"round": r.server_round, "node": c["node"], "task": c.get("task-id"), "position": c.get("drift-position")}
            for r in self.rounds
            for c in r.clients
            if c.get("drift-detected")
        ]

    def client_timelines(self) -> dict[int, list[tuple[int, int, bool, float]]]:
        """Per node: (round, task-id, drift-detected, prequential accuracy) for every accepted
        reply, in round order."""
        timelines: dict[int, list[tuple[int, int, bool, float]]] = {}
        for record in self.rounds:
            for c in record.clients:
                timelines.setdefault(c["node"], []).append(
                    (
                        record.server_round,
                        int(c.get("task-id", 0)),
                        bool(c.get("drift-detected")),
                        float(c.get("prequential-acc", 0.0)),
                    )
                )
        return timelines

    @property
    def rejects(self) -> list[dict[str, Any]]:
        return [r for record in self.rounds for r in record.rejected]
