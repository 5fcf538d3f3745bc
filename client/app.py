"""The Flower ClientApp: Message in, plain objects to ``client.rounds``, Message out.

The run's settings arrive with every message from the server (its ``config`` record), so a
client needs only its own ``partition-id`` (and optionally ``device``) in node_config.
The client's continual-learning state lives in ``context.state``.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.rounds import evaluate_round, train_round
from common.config import RunConfig

STATE_KEY = "fedtide-state"
app = ClientApp()


def _settings(msg: Message) -> tuple[RunConfig, int]:
    record = dict(msg.content["config"])
    server_round = int(record.pop("server-round", 0))
    return RunConfig.from_mapping(record, ignore_unknown=True), server_round


def _local(config: RunConfig, context: Context) -> RunConfig:
    """A node may hold its data elsewhere than the server said (node_config ``data-dir``)."""
    data_dir = context.node_config.get("data-dir")
    return config.replace(data_dir=str(data_dir)) if data_dir else config


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, server_round = _settings(msg)
    config = _local(config, context)
    state = context.state[STATE_KEY].to_torch_state_dict() if STATE_KEY in context.state else {}
    outcome = train_round(
        config,
        _partition(context),
        server_round,
        msg.content["arrays"].to_torch_state_dict(),
        state,
        device_name=context.node_config.get("device"),
    )
    context.state[STATE_KEY] = ArrayRecord(outcome.state)
    content = RecordDict({"arrays": ArrayRecord(outcome.weights), "metrics": MetricRecord(outcome.metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, server_round = _settings(msg)
    config = _local(config, context)
    metrics = evaluate_round(
        config,
        _partition(context),
        server_round,
        msg.content["arrays"].to_torch_state_dict(),
        device_name=context.node_config.get("device"),
    )
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
