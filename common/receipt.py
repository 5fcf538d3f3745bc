"""The receipt record of a training message, as both sides read it (see ``server.receipts``):
the run's identity and the last round whose kept global model holds this node's reply."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import FedtideError

RECEIPT_KEY = "receipt"  # the record's name in a training message
RUN_UID_KEY, AGGREGATED_KEY = "run-uid", "aggregated-round"
_UID = re.compile(r"^[0-9a-f]{8,64}$")
MAX_ROUND = 10**9


@dataclass(frozen=True)
class Receipt:
    run_uid: str
    aggregated_round: int

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
        return cls(uid, aggregated)

    @property
    def short_uid(self) -> str:
        return self.run_uid[:8]
