"""The receipt record of a training message, as both sides read it (see ``server.receipts``):
the run's identity, the last round whose kept global model holds this node's reply, and the
run's last round (0: not said)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import FedtideError

RECEIPT_KEY = "receipt"  # the record's name in a training message
RUN_UID_KEY, AGGREGATED_KEY, LAST_ROUND_KEY = "run-uid", "aggregated-round", "last-round"
_UID = re.compile(r"^[0-9a-f]{8,64}$")
MAX_ROUND = 10**9
NEW_RUN_CHOICES = ("fresh", "keep", "refuse")  # what an edge client's state of another run becomes
RUN_FINISHED_FILE = "run-finished"  # in an edge client's state folder once it trained the run's last round


@dataclass(frozen=True)
class Receipt:
    run_uid: str
    aggregated_round: int
    last_round: int = 0

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Receipt":
        """The receipt a server sent; FedtideError when it is not one (a client never trusts
        a message's values blindly, not even the server's)."""
        uid, aggregated = record.get(RUN_UID_KEY), record.get(AGGREGATED_KEY)
        if not isinstance(uid, str) or not _UID.match(uid):
            raise FedtideError(f"the server's receipt names no valid run ({RUN_UID_KEY} {str(uid)[:40]!r}): "
                               "run the server with `fedtide server` of the same version")
        if isinstance(aggregated, bool) or not isinstance(aggregated, int) or not 0 <= aggregated <= MAX_ROUND:
            raise FedtideError(f"the server's receipt holds no valid {AGGREGATED_KEY} ({str(aggregated)[:40]!r}): "
                               "run the server with `fedtide server` of the same version")
        last = record.get(LAST_ROUND_KEY, 0)
        if isinstance(last, bool) or not isinstance(last, int) or not 0 <= last <= MAX_ROUND:
            raise FedtideError(f"the server's receipt holds no valid {LAST_ROUND_KEY} ({str(last)[:40]!r}): "
                               "run the server with `fedtide server` of the same version")
        return cls(uid, aggregated, last)

    @property
    def short_uid(self) -> str:
        return self.run_uid[:8]
