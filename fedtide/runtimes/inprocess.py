"""The in-process runtime: Flower's ServerApp and ClientApp without Ray or sockets.

``InProcessGrid`` implements Flower's ``Grid``: each message the strategy sends is handed
straight to the ClientApp with that node's ``Context``, and the reply comes back the same
way. ``WorkerPoolGrid`` does the same in warm worker processes (one per core), each holding
its nodes' Contexts for the whole run, so a round's clients train in parallel. Either way
the very ServerApp and ClientApp code that runs under SuperLink/SuperNodes runs here, and
the numbers for a seed are the same (replies are aggregated in the order they were sent).
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from common.secure_aggregation import SECURE_STATE
from common.config import RunConfig
from common.sections import FaultSettings
from common.errors import FedtideError

if TYPE_CHECKING:
    import torch

SERVER_NODE_ID = 0
CLIENT_ERROR_CODE = 0


def _set_identity(run_id: int) -> None:
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVER_NODE_ID
    TaskIdentity.task_id = 1


def _new_context(run_id: int, node_id: int, node_config: dict[str, Any]) -> Context:
    return Context(run_id=run_id, node_id=node_id, node_config=dict(node_config), state=RecordDict(), run_config={})


def context_state(context: Context) -> dict[str, torch.Tensor]:
    """A node's ``context.state`` as flat named tensors (``<record>/<array>``), for a checkpoint.
    SecAgg+'s keys (``secaggplus_state``) live for one round and never go to disk."""
    flat = {}
    for name, record in context.state.items():
        if name == SECURE_STATE:
            continue
        if not isinstance(record, ArrayRecord):
            raise FedtideError(f"node {context.node_id} keeps a {type(record).__name__} '{name}' in its state: "
                               "only ArrayRecords can be checkpointed")
        flat.update({f"{name}/{key}": tensor for key, tensor in record.to_torch_state_dict().items()})
    return flat


def load_context_state(context: Context, flat: dict[str, torch.Tensor]) -> None:
    """Replace a node's ``context.state`` with what ``context_state`` returned."""
    records: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        name, _, array = key.partition("/")
        records.setdefault(name, {})[array] = tensor
    context.state = RecordDict({name: ArrayRecord(arrays) for name, arrays in records.items()})


def run_client(app: ClientApp, message: Message, context: Context) -> Message:
    """The ClientApp's reply; a failing client becomes an error reply, not a crashed server."""
    try:
        return app(message, context)
    except Exception as err:
        return Message(Error(code=CLIENT_ERROR_CODE, reason=f"{type(err).__name__}: {err}"), reply_to=message)


def deliver(app: ClientApp, train_many, messages: list[Message], contexts: dict[int, Context]) -> list[Message]:
    """Replies to ``messages``: all at once through ``train_many`` when it accepts them,
    else one ClientApp call per message."""
    if train_many is not None and len(messages) > 1:
        replies = train_many(messages, [contexts[m.metadata.dst_node_id] for m in messages])
        if replies is not None:
            return replies
    return [run_client(app, m, contexts[m.metadata.dst_node_id]) for m in messages]


class InProcessGrid(Grid):
    """Delivers messages by calling the ClientApp directly; replies are ready at once."""

    def __init__(
        self,
        client_app: ClientApp | None,
        node_configs: list[dict[str, Any]],
        run_id: int = 1,
        train_many: Callable[[list[Message], list[Context]], list[Message] | None] | None = None,
    ) -> None:
        self.client_app = client_app
        self.train_many = train_many
        self.vectorize = train_many is not None
        self.workers = 1  # processes the clients run in
        self.run_id = run_id
        self._run = Run.create_empty(run_id)
        _set_identity(run_id)
        self.node_configs = {node_id: cfg for node_id, cfg in enumerate(node_configs, start=1)}
        self.contexts = {n: _new_context(run_id, n, cfg) for n, cfg in self.node_configs.items()} if client_app else {}
        self._replies: dict[str, Message] = {}
        self._changed: set[int] | None = None  # nodes sent a message since the last mark_saved (None: all)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def _deliver_all(self, messages: list[Message]) -> list[Message]:
        return deliver(self.client_app, self.train_many, messages, self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        if self._changed is not None:  # only a message changes a node's state
            self._changed.update(m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id in self.node_configs)
        return self._deliver_all(messages)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        replies = self.send_and_receive(messages)
        for message, reply in zip(messages, replies):
            self._replies[message.metadata.message_id] = reply
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def node_states(self, changed_only: bool = False) -> dict[int, dict[str, torch.Tensor]]:
        """Every node's ``context.state`` (replay memory, method state, drift detector), or
        with ``changed_only`` those of the nodes sent a message since ``mark_saved`` (every
        node's before the first)."""
        return {node: context_state(self.contexts[node]) for node in self._wanted(changed_only)}

    def mark_saved(self) -> None:
        """The states as they are now are saved: ``changed_only`` counts from here."""
        self._changed = set()

    def _wanted(self, changed_only: bool) -> list[int]:
        return sorted(self.node_configs if self._changed is None or not changed_only else self._changed)

    def restore_node_states(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        for node, flat in states.items():
            load_context_state(self.contexts[node], flat)
        self.mark_saved()  # as the checkpoint left them

    def close(self) -> None:
        pass


def _worker_main(connection, run_id: int, node_configs: dict[int, dict[str, Any]], threads: int, vectorize: bool,
                 faults: FaultSettings) -> None:
    """A warm worker: keeps its nodes' Contexts and runs the ClientApp for each message sent."""
    import torch

    from client.faults import faulty_client_app, faulty_train_many

    app, train_many = faulty_client_app(faults), faulty_train_many(faults)

    torch.set_num_threads(threads)
    _set_identity(run_id)
    contexts = {n: _new_context(run_id, n, cfg) for n, cfg in node_configs.items()}
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        command, payload = request
        if command == "states":
            connection.send({node: context_state(contexts[node]) for node in payload})
        elif command == "restore":
            for node, flat in payload.items():
                load_context_state(contexts[node], flat)
            connection.send(True)
        else:
            connection.send(deliver(app, train_many if vectorize else None, payload, contexts))


class WorkerPoolGrid(InProcessGrid):
    """Nodes spread over ``workers`` processes; a round's messages run in all of them at once."""

    def __init__(self, node_configs: list[dict[str, Any]], workers: int, run_id: int = 1, vectorize: bool = True,
                 faults: FaultSettings = FaultSettings(), threads: int | None = None) -> None:
        super().__init__(None, node_configs, run_id)
        self.vectorize = vectorize
        self.workers = workers
        spawn = multiprocessing.get_context("spawn")  # fork is unsafe once torch started its threads
        threads = threads or max(1, (os.cpu_count() or 1) // workers)  # the cores, divided
        self._owner = {node: i % workers for i, node in enumerate(self.node_configs)}
        self._connections = []
        self._processes = []
        for index in range(workers):
            mine = {n: cfg for n, cfg in self.node_configs.items() if self._owner[n] == index}
            parent, child = spawn.Pipe()
            process = spawn.Process(target=_worker_main, args=(child, run_id, mine, threads, vectorize, faults), daemon=True)
            process.start()
            child.close()
            self._connections.append(parent)
            self._processes.append(process)

    def _deliver_all(self, messages: list[Message]) -> list[Message]:
        batches: dict[int, list[Message]] = {}
        for message in messages:
            batches.setdefault(self._owner[message.metadata.dst_node_id], []).append(message)
        for index, batch in batches.items():
            self._connections[index].send(("deliver", batch))
        replies: dict[str, Message] = {}
        for index, batch in batches.items():
            try:
                for reply in self._connections[index].recv():
                    replies[reply.metadata.reply_to_message_id] = reply
            except (EOFError, OSError) as err:
                for message in batch:
                    failure = Error(code=CLIENT_ERROR_CODE, reason=f"worker process {index} died: {err!r}")
                    replies[message.metadata.message_id] = Message(failure, reply_to=message)
        return [replies[m.metadata.message_id] for m in messages]

    def node_states(self, changed_only: bool = False) -> dict[int, dict[str, torch.Tensor]]:
        wanted = self._wanted(changed_only)
        states = {}
        for index, connection in enumerate(self._connections):
            connection.send(("states", [n for n in wanted if self._owner[n] == index]))
        for connection in self._connections:
            states.update(connection.recv())
        return dict(sorted(states.items()))

    def restore_node_states(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        for index, connection in enumerate(self._connections):
            connection.send(("restore", {n: s for n, s in states.items() if self._owner[n] == index}))
        for connection in self._connections:
            connection.recv()
        self.mark_saved()

    def close(self) -> None:
        for connection in self._connections:
            try:
                connection.send(None)
                connection.close()
            except (OSError, BrokenPipeError):
                pass
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def node_configs(config: RunConfig) -> list[dict[str, Any]]:
    return [{"partition-id": i, "num-partitions": config.data.clients} for i in range(config.data.clients)]


def default_workers(config: RunConfig) -> int:
    """One worker per core when there are clients to share; 1 means no worker processes."""
    return max(1, min(os.cpu_count() or 1, config.data.clients))


def run_inprocess(config: RunConfig, workers: int = 1, vectorize: bool = True, resume: bool = False,
                  threads: int | None = None) -> dict[str, Any]:
    """Run ``config`` with the project's ServerApp main and ClientApp in this process
    (``workers`` = 1) or across ``workers`` warm worker processes. With ``vectorize``, a
    round's clients that run plain SGD train in one batched computation. With ``resume``,
    go on with the run in ``config.run.out`` after its last checkpoint. ``threads``: torch's
    threads in this process and in each worker (default: torch's choice here, the cores
    divided among the workers there)."""
    import torch

    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    from client.faults import faulty_client_app, faulty_train_many
    from server.federation import quiet_flower_logs, run_federation

    quiet_flower_logs()
    if workers <= 1:
        train_many = faulty_train_many(config.faults) if vectorize else None
        grid = InProcessGrid(faulty_client_app(config.faults), node_configs(config), train_many=train_many)
    else:
        grid = WorkerPoolGrid(node_configs(config), workers, vectorize=vectorize, faults=config.faults, threads=threads)
    try:
        return run_federation(grid, config, resume=resume)
    finally:
        grid.close()
        torch.set_num_threads(threads_before)  # a caller's process keeps its own setting
