"""A ClientApp of your own, with fedtide's continual-learning client doing the learning.

The node reads its own stream (``task.node_stream``); ``ContinualLearner`` trains the
server's weights on it with replay, detects drift, and keeps its memory on disk between
rounds (here in a temporary folder per node and run)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from continual_client.task import SETTINGS, node_stream
from fedtide import ContinualLearner

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    partitions = int(context.node_config["num-partitions"])
    server_round = int(msg.content["config"]["server-round"])
    state_dir = Path(tempfile.gettempdir()) / "fedtide-example" / f"run-{context.run_id}" / f"node-{partition}"
    learner = ContinualLearner(SETTINGS, input_shape=(1, 8, 8), num_classes=10, state_dir=state_dir, node_id=partition)
    x, y = node_stream(partition, partitions, server_round)
    outcome = learner.train(msg.content["arrays"].to_torch_state_dict(), x, y, server_round)
    content = RecordDict({"arrays": ArrayRecord(outcome.weights), "metrics": MetricRecord(outcome.metrics)})
    return Message(content=content, reply_to=msg)
