"""Receipts: what the server tells each node about its earlier replies, so that an edge
client consumes its data exactly once.

An edge client trains on the files that arrived since its last round. Whether that round's
data reached the global model is known only to the server: the reply may have been dropped
(late, invalid, an outlier), or the server may have been killed before it checkpointed the
round and then redo it after ``--resume``. So every training message carries a receipt
record beside the settings:

- ``run-uid``: the run's identity, made once when a run starts and kept through resumes
  (a client's state belongs to one run; a new uid is a new run);
- ``aggregated-round``: the last round in which this node's reply reached a global model
  that the server kept (0: none yet). It is part of the checkpoint, so after a resume it
  names only rounds the resumed run still holds;
- ``last-round``: the run's last round (0 when the strategy was not told), so that an edge
  client knows when the run is over (``fedtide client`` then ends with it).

The client keeps a round's files pending until a receipt covers that round, and trains on
them again when it does not (``client.state_store``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from common.receipt import AGGREGATED_KEY, LAST_ROUND_KEY, RECEIPT_KEY, RUN_UID_KEY


def new_run_uid() -> str:
    return uuid.uuid4().hex


class Receipts:
    """The last aggregated round of each node, and the stamp it puts on training messages."""

    def __init__(self, run_uid: str | None = None, last_round: int = 0) -> None:
        self.run_uid = run_uid or new_run_uid()
        self.last_round = last_round
        self.last_aggregated: dict[int, int] = {}

    def stamp(self, messages: list[Message]) -> list[Message]:
        """Give each message its node's receipt (the model and settings stay shared)."""
        for message in messages:
            node = message.metadata.dst_node_id
            content = RecordDict(dict(message.content))
            content[RECEIPT_KEY] = ConfigRecord({
                RUN_UID_KEY: self.run_uid, AGGREGATED_KEY: self.last_aggregated.get(node, 0),
                LAST_ROUND_KEY: self.last_round,
            })
            message.content = content
        return messages

    def aggregated(self, server_round: int, nodes: Iterable[int]) -> None:
        """``nodes``' replies of ``server_round`` are in the global model the server keeps."""
        for node in nodes:
            self.last_aggregated[int(node)] = server_round

    def state(self) -> dict[str, Any]:
        return {"receipts": {"run_uid": self.run_uid,
                             "last_aggregated": {str(n): r for n, r in self.last_aggregated.items()}}}

    def load_state(self, state: dict[str, Any]) -> None:
        if "receipts" in state:
            saved = state["receipts"]
            self.run_uid = str(saved["run_uid"])
            self.last_aggregated = {int(n): int(r) for n, r in saved["last_aggregated"].items()}
