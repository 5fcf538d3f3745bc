"""What happened in a run, round by round: the source of metrics.jsonl, the matrix and the plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.config import SAMPLE_EPSILON_KEY
from common.schedule import TaskSchedule
from server.node_names import NodeNames


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
    excluded: list[int] = field(default_factory=list)  # nodes excluded in this round
    aggregation: dict[str, Any] = field(default_factory=dict)  # set when the round kept the old model
    capped: dict[str, int] = field(default_factory=dict)  # replies whose weight or update the influence bound cut
    served_acc: float | None = None  # mean over replying nodes: the served model on the node's task
    release: dict[str, Any] = field(default_factory=dict)  # the version served after the round; a new one
    epsilon: float | None = None  # --dp: the privacy budget spent so far, at the run's delta

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
            **({"excluded": self.excluded} if self.excluded else {}),
            **({"aggregation": self.aggregation} if self.aggregation else {}),
            **({"capped": self.capped} if self.capped else {}),
            **({"served_acc": self.served_acc} if self.served_acc is not None else {}),
            **({"release": self.release} if self.release else {}),
            **({"epsilon": self.epsilon} if self.epsilon is not None else {}),
        }


    @classmethod
    def from_json(cls, line: dict[str, Any]) -> "RoundRecord":
        """The record ``as_json`` wrote (a line of metrics.jsonl)."""
        return cls(
            server_round=line["round"], task=line["task"], task_accuracies=line["task_accuracies"],
            train=line.get("train", {}), client_evaluation=line.get("client_evaluation", {}),
            clients=line.get("clients", []), rejected=line.get("rejected", []), seconds=line.get("seconds", 0.0),
            excluded=line.get("excluded", []), aggregation=line.get("aggregation", {}),
            capped=line.get("capped", {}), served_acc=line.get("served_acc"), release=line.get("release", {}), epsilon=line.get("epsilon"),
        )


class RunHistory:
    """Collects per-round figures; accuracy-matrix row i is read at ``schedule.end_round(i)``."""

    def __init__(self, schedule: TaskSchedule | None = None, names: NodeNames | None = None) -> None:
        """``schedule``: the run's task schedule; a strategy used in your own ServerApp keeps its
        log without one (one task, rounds numbered as they come). ``names``: the nodes' human
        names (``server.node_names``), written beside their ids where known."""
        self.names = names or NodeNames(None)
        self.schedule = schedule or TaskSchedule.build(num_tasks=1, rounds_per_task=1, clients=1, spread=0, seed=0)
        self.num_tasks = self.schedule.num_tasks
        self.baseline: list[float] = []
        self.rounds: list[RoundRecord] = []
        self._pending_clients: list[dict[str, Any]] = []
        self._pending_rejects: list[dict[str, Any]] = []
        self._pending_train: dict[str, float] = {}
        self._pending_evaluation: dict[str, float] = {}
        self._pending_excluded: list[int] = []
        self._pending_aggregation: dict[str, Any] = {}
        self._pending_capped: dict[str, int] = {}
        self._pending_epsilon: float | None = None

    # called from the strategy while a round is aggregated
    def client_reply(self, node_id: int, metrics: dict[str, Any]) -> None:
        """``metrics``: as the reply schema kept them (``server.reply_metrics``); the node id is
        the server's, never the client's word."""
        self._pending_clients.append({**metrics, **self._node(node_id)})

    def rejected_reply(self, server_round: int, node_id: int, reason: str) -> None:
        self._pending_rejects.append({"round": server_round, **self._node(node_id), "reason": reason})

    def label(self, node_id: int) -> str:
        """How a log line names a node: ``node-3 (6435071288605390923)``, or its id alone."""
        name = self.names.name(node_id)
        return f"{name} ({node_id})" if name else str(node_id)

    def _node(self, node_id: int) -> dict[str, Any]:
        name = self.names.name(node_id)
        return {"node": node_id, "name": name} if name else {"node": node_id}

    def node_excluded(self, server_round: int, node_id: int) -> None:
        self._pending_excluded.append(node_id)

    def aggregation_skipped(self, server_round: int, rule: str, reason: str) -> None:
        """This round aggregated nothing: the global model stays, for ``reason``."""
        self._pending_aggregation = {"rule": rule, "skipped": reason}

    def aggregation_weights(self, weights: list[float]) -> None:
        """The weights the round's accepted replies entered aggregation with (after the
        influence bound's cap and the drift reactions), in the order of ``client_reply``:
        each reply's record gets its share as ``weight-share``."""
        total = sum(weights)
        if len(weights) != len(self._pending_clients) or not total > 0:
            return
        for client, weight in zip(self._pending_clients, weights):
            client["weight-share"] = weight / total

    def influence_capped(self, weights: int, updates: int) -> None:
        """The influence bound cut ``weights`` claimed weights and ``updates`` updates."""
        self._pending_capped = {"weights": weights, "updates": updates}

    def privacy_spent(self, epsilon: float) -> None:
        """The budget spent after this round's aggregation (``server.privacy``)."""
        self._pending_epsilon = epsilon

    def train_metrics(self, metrics: dict[str, float]) -> None:
        self._pending_train = dict(metrics)

    def evaluate_metrics(self, metrics: dict[str, float]) -> None:
        self._pending_evaluation = dict(metrics)

    def round_tasks(self) -> dict[int, int]:
        """The task each node that replied in this round reported training on (``task-id``)."""
        return {c["node"]: int(c["task-id"]) for c in self._pending_clients if "task-id" in c}

    # called after the global model was evaluated
    def close_round(self, server_round: int, task_accuracies: list[float], seconds: float,
                    served_acc: float | None = None) -> RoundRecord | None:
        if server_round == 0:
            self.baseline = list(task_accuracies)
            return None
        reported = [float(c[SAMPLE_EPSILON_KEY]) for c in self._pending_clients if SAMPLE_EPSILON_KEY in c]
        if reported:  # --dp sample: each client's own accountant; the run's budget is the largest
            self._pending_epsilon = max(self._pending_epsilon or 0.0, *reported)
        record = RoundRecord(
            server_round=server_round,
            task=self.schedule.newest_task(server_round),
            task_accuracies=list(task_accuracies),
            train=self._pending_train,
            client_evaluation=self._pending_evaluation,
            clients=self._pending_clients,
            rejected=self._pending_rejects,
            seconds=seconds,
            excluded=self._pending_excluded,
            aggregation=self._pending_aggregation,
            capped=self._pending_capped,
            served_acc=served_acc,
            epsilon=self._pending_epsilon,  # stays as it was after a round that aggregated nothing
        )
        self.rounds.append(record)
        self._pending_clients, self._pending_rejects = [], []
        self._pending_excluded, self._pending_aggregation, self._pending_capped = [], {}, {}
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
            {"round": r.server_round, "node": c["node"], **({"name": c["name"]} if "name" in c else {}),
             "task": c.get("task-id"), "position": c.get("drift-position")}
            for r in self.rounds
            for c in r.clients
            if c.get("drift-detected")
        ]

    def client_timelines(self) -> dict[int, list[tuple[int, int, bool, float]]]:
        """Per node: (round, task-id, drift-detected, prequential accuracy) for every accepted
        reply that reports its task-id, in round order. A reply without one (e.g. from a plain
        Flower client) is left out: counted as task 0 it would fake task switches."""
        timelines: dict[int, list[tuple[int, int, bool, float]]] = {}
        for record in self.rounds:
            for c in record.clients:
                if "task-id" not in c:
                    continue
                timelines.setdefault(c["node"], []).append(
                    (
                        record.server_round,
                        int(c.get("task-id", 0)),
                        bool(c.get("drift-detected")),
                        float(c.get("prequential-acc", 0.0)),
                    )
                )
        return timelines

    def reported(self, metric: str) -> bool:
        """Whether any accepted reply so far carried ``metric`` (plain Flower clients send
        only ``num-examples``)."""
        return any(metric in c for record in self.rounds for c in record.clients)

    @property
    def rejects(self) -> list[dict[str, Any]]:
        return [r for record in self.rounds for r in record.rejected]

    def rejects_so_far(self) -> list[dict[str, Any]]:
        """Every rejected reply so far, this round's included."""
        return [*self.rejects, *self._pending_rejects]

    def reject_count(self, node_id: int) -> int:
        """Rejected replies of a node so far, this round's included."""
        return sum(1 for r in self.rejects_so_far() if r["node"] == node_id)

    @property
    def excluded_nodes(self) -> set[int]:
        """Nodes excluded so far, this round's included (the history is the strategy's memory
        of it, so that a resumed run keeps them excluded)."""
        return {n for record in self.rounds for n in record.excluded} | set(self._pending_excluded)

    def node_rejects(self) -> "NodeRejects":
        tally = NodeRejects()
        for record in self.rounds:
            tally.add(record)
        return tally


class NodeRejects:
    """Per node: how many of its replies were rejected, the last reasons, and the round it
    was excluded in (if it was). The content of the run folder's ``node_rejects.json``."""

    LAST = 3  # reasons kept per node

    def __init__(self) -> None:
        self.nodes: dict[int, dict[str, Any]] = {}

    def add(self, record: RoundRecord) -> bool:
        """Count a round's rejects and exclusions; True when anything changed."""
        for reject in record.rejected:
            entry = self.nodes.setdefault(reject["node"], {"rejects": 0, "last_reasons": [], "excluded_round": None})
            if "name" in reject:
                entry["name"] = reject["name"]
            entry["rejects"] += 1
            entry["last_reasons"] = (entry["last_reasons"] + [{"round": reject["round"], "reason": reject["reason"]}])[
                -self.LAST :
            ]
        for node in record.excluded:
            self.nodes.setdefault(node, {"rejects": 0, "last_reasons": [], "excluded_round": None})
            self.nodes[node]["excluded_round"] = record.server_round
        return bool(record.rejected or record.excluded)

    def as_json(self) -> dict[str, Any]:
        return {str(node): self.nodes[node] for node in sorted(self.nodes)}
