"""A plain Flower ClientApp: local SGD, a reply of arrays and num-examples. Node 0 is a
broken device: it sends weights that are all NaN, and claims a huge number of samples."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from robust_server.task import model, share

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = share(partition, int(context.node_config["num-partitions"]))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    weights = net.state_dict()
    claimed = len(y)
    if partition == 0:  # the broken device
        weights = {name: torch.full_like(t, float("nan")) for name, t in weights.items()}
        claimed = 10**9
    content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": claimed})})
    return Message(content=content, reply_to=msg)
