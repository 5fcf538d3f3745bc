"""The in-process runtime: Flower's ServerApp and ClientApp in one process, no Ray, no sockets.

``InProcessGrid`` implements Flower's ``Grid``: each message the strategy sends is handed
straight to the ClientApp with that node's ``Context``, and the reply comes back the same
way. So the very ServerApp and ClientApp code that runs under SuperLink/SuperNodes runs
here too, deterministically for a seed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig

SERVER_NODE_ID = 0
CLIENT_ERROR_CODE = 0


class InProcessGrid(Grid):
    """Delivers messages by calling the ClientApp directly; replies are ready at once."""

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1
        self.contexts = {
            node_id: Context(run_id=run_id, node_id=node_id, node_config=dict(cfg), state=RecordDict(), run_config={})
            for node_id, cfg in enumerate(node_configs, start=1)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, message: Message) -> Message:
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        context = self.contexts[message.metadata.dst_node_id]
        try:
            return self.client_app(message, context)
        except Exception as err:  # a failing client is a failed reply, not a crashed server
            return Message(Error(code=CLIENT_ERROR_CODE, reason=f"{type(err).__name__}: {err}"), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            reply = self._deliver(message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._deliver(message) for message in messages]


def node_configs(config: RunConfig) -> list[dict[str, Any]]:
    return [{"partition-id": i, "num-partitions": config.clients} for i in range(config.clients)]


def run_inprocess(config: RunConfig) -> dict[str, Any]:
    """Run ``config`` with the project's ServerApp main and ClientApp in this process."""
    from client.app import app as client_app
    from server.federation import quiet_flower_logs, run_federation

    quiet_flower_logs()
    grid = InProcessGrid(client_app, node_configs(config))
    return run_federation(grid, config)
