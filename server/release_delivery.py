"""Serving the released model to the devices, beside the model they train.

An edge client keeps the released model to answer predictions (``client.released_model``)
and says in each reply which version it holds (``released-version``, 0 for none). Every
training message to such a node names the version served now and its sha256 (config record
``release``); one to a node that holds another version also carries the weights (array record
``released``). The device checks the digest before it keeps them, and reports 0 when what it
holds is not the version named (a model of an earlier run, a number given again after a
resume), so that it is sent the right one next. A node that never said what
it holds (a simulated client, a plain Flower client) is sent nothing, so simulations pay no
extra traffic; an edge client gets the model from its second round on, and again after every
release or rollback (``fedtide models rollback`` on a live run is served from the next round).
The claim only decides whether a node is sent the model: a node that lies costs itself downlink.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

import logging

from common.config import HELD_VERSION_KEY, RELEASE_INFO_KEY, RELEASED_KEY
from common.errors import FedtideError
from server.model_registry import ModelRegistry
from server.round_hooks import RoundHook
from server.validation import METRICS_KEY

log = logging.getLogger("fedtide.release")


class ReleasedModelDelivery(RoundHook):
    """Adds the released model to the training messages of the nodes that need it."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.held: dict[int, int] = {}  # node -> the version its last accepted reply said it holds
        self._served: tuple[int, str, ArrayRecord] | None = None  # (version, sha256, weights) last read
        self.deliveries = 0

    def _released(self) -> tuple[int, str, ArrayRecord] | None:
        """The version served now, read from the registry (an operator may have rolled back)."""
        if not self.registry.exists():
            return None
        with self.registry.open() as registry:
            current = registry.current
            if current is None:
                return None
            if self._served is None or self._served[:2] != (current["version"], current["sha256"]):
                weights = self.registry.weights(current)
                self._served = (current["version"], current["sha256"],
                                ArrayRecord({name: Array(t.numpy()) for name, t in weights.items()}))
        return self._served

    def configure(self, server_round, messages):
        waiting = [m for m in messages if m.metadata.dst_node_id in self.held]
        try:
            served = self._released() if waiting else None
        except FedtideError as err:  # the registry's files are damaged or gone: devices keep what they hold
            log.warning("round %d: the released model is not served: %s", server_round, err)
            return messages
        if served is None:
            return messages
        version, sha256, record = served
        for message in waiting:
            content = RecordDict(dict(message.content))
            content[RELEASE_INFO_KEY] = ConfigRecord({"version": version, "sha256": sha256})
            if self.held[message.metadata.dst_node_id] != version:
                content[RELEASED_KEY] = record
                self.deliveries += 1
            message.content = content
        return messages

    def after_aggregate(self, server_round, accepted):
        for reply in accepted:
            held = reply.content.metric_records[METRICS_KEY].get(HELD_VERSION_KEY)
            if held is not None:
                self.held[reply.metadata.src_node_id] = int(held)

    def state(self) -> dict[str, Any]:
        return {"release_held": {str(node): version for node, version in self.held.items()},
                "release_deliveries": self.deliveries}

    def load_state(self, state: dict[str, Any]) -> None:
        if "release_held" in state:
            self.held = {int(node): int(version) for node, version in state["release_held"].items()}
            self.deliveries = int(state.get("release_deliveries", 0))

    def summary(self) -> dict[str, Any]:
        return {"release_deliveries": self.deliveries}
