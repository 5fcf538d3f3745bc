"""What a device spent of its privacy budget (``--dp sample``), in a file nothing resets.

The client's run state (``client.state_store``) may start clean: a new server run with
``--new-run fresh`` moves it aside and reads every inbox file again as new, and a damaged
state file is moved aside too. The samples are then trained on again, so the budget they
spent must go on counting. ``<state_dir>/privacy-ledger.json`` holds the device's DP-SGD
history, the rows (noise multiplier, sampling rate, steps) of ``client.dp_sgd.SampleBudget``,
across runs and restarts. It is written before a round's reply leaves the device (a reply the
server then drops still counts: it may have been seen), and read before each round as the
authority over the state's own copy. A ledger that cannot be read, or whose checksum does not
match, stops the client: only its owner can say what was spent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from client.dp_sgd import plausible_history
from common.errors import FedtideError
from common.files import write_bytes_atomic

LEDGER_FILE = "privacy-ledger.json"
FORMAT = "fedtide-dp-ledger/1"
MAX_BYTES = 1 << 20  # equal (noise, rate) rows merge: a real ledger is a few hundred bytes


def _digest(rows: list[list[float]]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


class PrivacyLedger:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LEDGER_FILE

    def load(self) -> torch.Tensor | None:
        """The rows spent so far ([k, 3] float64), or None when the device never trained privately."""
        if not self.path.exists():
            return None
        problem = None
        try:
            if self.path.is_symlink() or self.path.stat().st_size > MAX_BYTES:
                problem = "a link, or larger than any ledger"
            else:
                record = json.loads(self.path.read_text())
                rows = record["rows"]
                if record.get("format") != FORMAT or record.get("sha256") != _digest(rows):
                    problem = "its checksum or format does not match"
                else:
                    spent = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)
                    if not plausible_history(spent):
                        problem = "it holds values no accountant wrote"
                    else:
                        return spent
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, ArithmeticError) as err:
            problem = f"it cannot be read ({str(err)[:80]})"
        raise FedtideError(f"the privacy ledger {self.path} is damaged: {problem}. The budget this device spent is "
                           "unknown, so it will not train: restore the file from a backup (delete it only if the "
                           "device's samples are gone too)")

    def save(self, spent: torch.Tensor) -> None:
        rows = [[float(v) for v in row] for row in spent.reshape(-1, 3).tolist()]
        text = json.dumps({"format": FORMAT, "rows": rows, "sha256": _digest(rows)})
        write_bytes_atomic(self.path, text.encode(), mode=0o600)


def merge_spent(ledger: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """The larger count of steps for each (noise, rate) of the two: a ledger restored from an
    older backup never lowers what the state knows was spent, nor the other way round."""
    steps: dict[tuple[float, float], float] = {}
    for rows in (ledger, state if state is not None else torch.zeros(0, 3, dtype=torch.float64)):
        for noise, rate, count in rows.reshape(-1, 3).tolist():
            steps[(noise, rate)] = max(steps.get((noise, rate), 0.0), count)
    return torch.tensor([[n, q, c] for (n, q), c in steps.items()], dtype=torch.float64).reshape(-1, 3)
