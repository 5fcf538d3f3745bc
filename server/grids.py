"""Wrappers around a Flower ``Grid``: each adds one concern and hands everything else on."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.errors import FedtideError

log = logging.getLogger("fedtide.server")


class GridWrapper(Grid):
    """Delegates every Grid call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 1.0, clock=time.monotonic) -> None:
    """Return once ``minimum`` nodes are connected. Flower's strategies would wait forever;
    after ``timeout`` seconds with fewer this raises a FedtideError that says how many came
    and what to do."""
    started = None
    while len(nodes := list(grid.get_node_ids())) < minimum:
        now = clock()
        if started is None:
            started = now
            log.info("waiting for clients: %d of %d connected", len(nodes), minimum)
        elif now - started > timeout:
            raise FedtideError(
                f"only {len(nodes)} of the {minimum} clients a round needs connected within "
                f"{timeout:.0f} s: start the missing clients (`fedtide client ...`), or lower "
                "--min-clients, or wait longer with --client-wait"
            )
        time.sleep(poll)


def bound_reply_pulls(max_seconds: float) -> None:
    """Bound how long Flower's deployment Grid waits for a reply's contents.

    A client that dies halfway through uploading its reply leaves the message without all
    its objects; Flower 1.41's Grid then retries pulling them for up to two hours inside a
    single ``pull_messages`` call, so the round outlives any ``--round-timeout``. With this
    bound the reply becomes an error reply after ``max_seconds`` (dropped like any failed
    client's) and the round goes on. Does nothing where that Grid is absent.
    """
    try:
        from flwr.superlink.grid import http_grid
    except ImportError:
        return
    original = getattr(http_grid, "pull_objects", None)
    if original is None or getattr(original, "fedtide_bound", None) is not None:
        return

    def bounded(*args, **kwargs):
        kwargs.setdefault("max_time", max_seconds)
        return original(*args, **kwargs)

    bounded.fedtide_bound = max_seconds
    http_grid.pull_objects = bounded
