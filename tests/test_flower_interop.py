"""fedtide and plain Flower apps work together: a plain Flower ClientApp (only ``arrays`` and
``num-examples``) through fedtide's server, and Flower's own FedAvg driving fedtide's ClientApp."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from rich.console import Console

from client.app import app as fedtide_client_app
from common.config import RunConfig
from common.files import load_tensors
from common.models import build_model
from common.scenarios import build_scenario
from common.schedule import TaskSchedule
from fedtide.runtimes.inprocess import InProcessGrid, node_configs
from server.federation import run_federation, summarize_run
from server.history import RunHistory

STEP = 0.01  # what the plain client adds to every weight, each round


def plain_flower_client(received: list[dict[str, np.ndarray]]) -> ClientApp:
    """A ClientApp as a Flower user writes one: no fedtide import, no fedtide metric. It
    "trains" by adding ``STEP`` to every weight; ``received`` collects what the server sent."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        received.append(dict(zip(msg.content["arrays"].keys(), arrays)))
        trained = ArrayRecord({k: Array(a + np.asarray(STEP, a.dtype)) for k, a in zip(msg.content["arrays"].keys(), arrays)})
        reply = RecordDict({"arrays": trained, "metrics": MetricRecord({"num-examples": 32})})
        return Message(content=reply, reply_to=msg)

    return app


def test_a_plain_flower_client_trains_through_fedtides_server_and_the_summary_names_what_it_cannot_say(tmp_path):
    config = RunConfig.of(num_tasks=2, rounds_per_task=1, clients=2, out=str(tmp_path / "run"), quiet=False)
    received: list[dict[str, np.ndarray]] = []
    grid = InProcessGrid(plain_flower_client(received), [{"partition-id": i} for i in range(config.data.clients)])
    screen = io.StringIO()

    summary = run_federation(grid, config, console=Console(file=screen, width=200))

    assert len(received) == config.data.clients * config.num_rounds  # every client trained in every round
    final = load_tensors(tmp_path / "run" / "model.safetensors")
    for name, start in received[0].items():  # the plain clients' updates are the global model
        np.testing.assert_allclose(final[name].numpy(), start + STEP * config.num_rounds, atol=1e-5)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["rounds"] == config.num_rounds
    assert 0.0 <= written["acc"] <= 1.0 and len(written["accuracy_matrix"]) == config.data.num_tasks
    assert written["final_prequential_acc"] is None
    assert written["client_rounds_to_recover"] is None
    assert written["drift_events"] is None
    assert written["drift_detection"] is None
    assert written["unavailable"] == [
        "final_prequential_acc: no client reported prequential-acc",
        "client_rounds_to_recover: no client reported task-id or prequential-acc",
        "drift_events: no client reported drift-detected",
        "drift_detection: no client reported task-id or drift-detected",
    ]
    assert summary["unavailable"] == written["unavailable"]
    table = screen.getvalue()
    assert "final prequential accuracy (%)" in table and "n/a" in table
    assert "no client reported prequential-acc" in table


def _history(config: RunConfig, replies_per_round: list[list[dict]]) -> RunHistory:
    history = RunHistory(TaskSchedule.build(config.data.num_tasks, config.data.rounds_per_task, config.data.clients, 0, config.seed))
    history.close_round(0, [0.0] * config.data.num_tasks, 0.0)
    for server_round, replies in enumerate(replies_per_round, start=1):
        for node, metrics in replies:
            history.client_reply(node, metrics)
        history.close_round(server_round, [0.5] * config.data.num_tasks, 0.0)
    return history


def test_replies_without_a_task_id_are_left_out_of_drift_scoring_not_counted_as_task_0():
    """Node 1 answers once as a plain Flower client (between two task-1 replies); counted as
    task 0 that would fake a task switch 0 -> 1 that its detector missed."""
    config = RunConfig.of(num_tasks=2, rounds_per_task=2, clients=2)
    fedtide = {"num-examples": 10, "prequential-acc": 0.8, "drift-detected": 0, "drift-position": -1}
    history = _history(config, [
        [(1, {**fedtide, "task-id": 0}), (2, {**fedtide, "task-id": 0})],
        [(1, {**fedtide, "task-id": 1, "drift-detected": 1}), (2, {**fedtide, "task-id": 0})],
        [(1, {"num-examples": 10}), (2, {**fedtide, "task-id": 1, "drift-detected": 1})],
        [(1, {**fedtide, "task-id": 1}), (2, {"num-examples": 30})],
    ])

    assert [entry[0] for entry in history.client_timelines()[1]] == [1, 2, 4]
    summary = summarize_run(config, build_scenario(config.data, config.seed), history, model_bytes=0)

    assert summary["drift_detection"]["switches"] == 2
    assert summary["drift_detection"]["detected"] == 2 and summary["drift_detection"]["false_alarms"] == 0
    assert summary["final_prequential_acc"] == pytest.approx(0.8)  # the plain reply neither counts nor weighs
    assert "unavailable" not in summary


def test_flowers_own_fedavg_drives_fedtides_client_app():
    """A plain Flower ServerApp loop: the client needs fedtide's settings and the model's
    shape in the train config, and nothing else from fedtide's server."""
    config = RunConfig.of(num_tasks=2, rounds_per_task=1, clients=2, client_samples=200, local_epochs=1, method="naive")
    scenario = build_scenario(config.data, config.seed)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths, config.seed)
    initial = ArrayRecord(model.state_dict())
    settings = {k: v for k, v in config.to_mapping().items() if k not in ("out", "quiet")}
    settings["input-shape"] = ",".join(str(d) for d in scenario.input_shape)
    settings["num-classes"] = scenario.num_classes

    result = FedAvg(fraction_evaluate=0.0).start(
        grid=InProcessGrid(fedtide_client_app, node_configs(config)),
        initial_arrays=initial,
        num_rounds=2,
        train_config=ConfigRecord(settings),
    )

    before, after = initial.to_numpy_ndarrays(), result.arrays.to_numpy_ndarrays()
    assert list(result.arrays.keys()) == list(initial.keys())
    assert all(np.isfinite(a).all() for a in after)
    assert sum(float(np.abs(a - b).sum()) for a, b in zip(after, before)) > 1e-3
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert 0.0 < result.train_metrics_clientapp[2]["prequential-acc"] <= 1.0
    assert result.train_metrics_clientapp[2]["task-id"] == 1  # round 2 is task 1's round
