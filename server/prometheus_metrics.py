"""Prometheus metrics of a live run (``--metrics-address HOST:PORT``): what an operator's
dashboard and alerts read while ``fedtide server`` (or a simulation) runs.

Served by prometheus-client (``pip install "fedtide[ops]"``) from the process that runs the
rounds, on a registry of its own, updated once per round:

- ``fedtide_round``, ``fedtide_task``, ``fedtide_rounds_total``: where the run is;
- ``fedtide_task_accuracy{task}``, ``fedtide_accuracy_seen_tasks``: the global model's accuracy on
  each task's held-out test set and over the tasks seen;
- ``fedtide_nodes{state=connected|replied|rejected}``: the round's nodes;
- ``fedtide_replies_total{outcome=accepted|rejected}``, ``fedtide_drift_events_total``: counters;
- ``fedtide_round_duration_seconds``: the last round's wall time;
- ``fedtide_model_version`` (rounds aggregated) and ``fedtide_released_version`` (served to devices).

The address is bound when the run starts: a port in use stops the run before any round.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from common.addresses import parse_address
from common.errors import FedtideError
from server.history import RoundRecord

INSTALL = 'pip install "fedtide[ops]"'


class PrometheusMetrics:
    """The run's metrics, served at ``address`` until ``close``."""

    def __init__(self, address: str, num_tasks: int) -> None:
        host, port = parse_address(address, "--metrics-address", "127.0.0.1:9100")
        if importlib.util.find_spec("prometheus_client") is None:
            raise FedtideError(f"--metrics-address needs prometheus-client: {INSTALL}")
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        gauge = lambda name, doc, labels=(): Gauge(name, doc, labels, registry=self.registry)  # noqa: E731
        self.round = gauge("fedtide_round", "the last completed round")
        self.task = gauge("fedtide_task", "the newest task any client trained on in the last round")
        self.task_accuracy = gauge("fedtide_task_accuracy", "the global model's accuracy on a task's test set", ("task",))
        self.seen = gauge("fedtide_accuracy_seen_tasks", "the global model's mean accuracy over the tasks seen")
        self.nodes = gauge("fedtide_nodes", "nodes in the last round", ("state",))
        self.duration = gauge("fedtide_round_duration_seconds", "wall time of the last round")
        self.model_version = gauge("fedtide_model_version", "rounds aggregated into the global model")
        self.released = gauge("fedtide_released_version", "the model version served to devices (0: none yet)")
        self.epsilon = gauge("fedtide_privacy_epsilon", "--dp: the privacy budget spent so far, at the run's delta "
                             "(sample: the largest a client reported)")
        self.replies = Counter("fedtide_replies", "training replies", ("outcome",), registry=self.registry)
        self.drift = Counter("fedtide_drift_events", "drift reported by clients", registry=self.registry)
        self.rounds = Counter("fedtide_rounds", "rounds completed by this process", registry=self.registry)
        for task in range(num_tasks):
            self.task_accuracy.labels(task=str(task)).set(0)
        try:
            self.server, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as err:
            raise FedtideError(f"--metrics-address {address}: cannot listen there ({err.strerror or err}): choose "
                               "another port") from None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def round_done(self, record: RoundRecord, connected: int | None) -> None:
        line = record.as_json()
        self.round.set(record.server_round)
        self.task.set(record.task)
        for task, accuracy in enumerate(record.task_accuracies):
            self.task_accuracy.labels(task=str(task)).set(accuracy)
        self.seen.set(line["accuracy_seen_tasks"])
        if connected is not None:
            self.nodes.labels(state="connected").set(connected)
        self.nodes.labels(state="replied").set(len(record.clients))
        self.nodes.labels(state="rejected").set(len(record.rejected))
        self.replies.labels(outcome="accepted").inc(len(record.clients))
        self.replies.labels(outcome="rejected").inc(len(record.rejected))
        self.drift.inc(sum(1 for c in record.clients if c.get("drift-detected")))
        self.duration.set(record.seconds)
        self.model_version.set(record.server_round)
        self.released.set(record.release.get("released") or 0)
        if record.epsilon is not None:
            self.epsilon.set(record.epsilon)
        self.rounds.inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "PrometheusMetrics":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
