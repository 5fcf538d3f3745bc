"""The edge client's state on disk, so that it survives a restart of the process.

Flower keeps a ClientApp's ``context.state`` in memory only. On an edge device the client's
state (replay memory, EWC Fisher and anchor, LwF teacher, drift detector, ...) and its ledger
of consumed inbox files live in one file, ``<state_dir>/state.safetensors``:

- tensors: the client state, a flat dict as ``client.rounds`` produces it;
- metadata ``ledger``: the ledger as JSON (a list of dicts), and checksums of the ledger and
  of the tensors' bytes (``ledger-sha256``, ``payload-sha256``).

The file is replaced atomically in one write, so after a crash the state and the ledger are
both the old ones or both the new ones, never a mix. A file that cannot be parsed or whose
checksums do not match is moved aside to ``state.safetensors.corrupt-<time>`` and the client
starts clean (a warning is logged): it loses its memory, not its ability to train.

**Exactly once.** With a server that sends receipts (``common.receipt``), a round's outcome is
first written as ``pending.safetensors`` (the next state file, whole, with the round and the
run it belongs to). At the next round the receipt decides: when the server kept a global
model holding this node's reply of that round, the pending file replaces the state (one
rename: its files are consumed); otherwise (the reply was dropped, or the server was killed
and redoes the round after a resume) it is deleted, and its files are read again as new.

**One run.** The state records the run it belongs to. A message of another run (a new server
run) finds it and, as the client was told (``NEW_RUN_CHOICES``): ``fresh`` moves it to
``previous-runs/`` and starts clean (every inbox file is new to the new run), ``keep`` carries
it into the new run, ``refuse`` stops with a message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.errors import FedtideError
from common.files import save_tensors_atomic
from common.receipt import NEW_RUN_CHOICES, RUN_FINISHED_FILE, Receipt

STATE_FILE = "state.safetensors"
PENDING_FILE = "pending.safetensors"
LOCK_FILE = "round.lock"
PREVIOUS_RUNS = "previous-runs"
KEEP_PREVIOUS = 3  # states of earlier runs kept in previous-runs/ (the oldest go)
PRIVATE = 0o600
FORMAT = "fedtide-client-state/1"
LEDGER_FIELDS = {"name": str, "size": int, "sha256": str}

log = logging.getLogger("fedtide.client")


@dataclass(frozen=True)
class Pending:
    """A round's outcome waiting for the server's receipt (``pending.safetensors``)."""

    server_round: int
    run_uid: str
    tensors: dict[str, torch.Tensor]
    ledger: list[dict]

    @property
    def new_files(self) -> int:
        return sum(1 for entry in self.ledger if entry.get("round") == self.server_round)


class ClientStateStore:
    """Loads and saves ``(tensors, ledger)`` in ``state_dir``; creates the folder if needed.

    Raises FedtideError when the folder cannot be created or written."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = Path(state_dir)
        self.path = self.folder / STATE_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.folder):
                pass
        except OSError as err:
            raise self._unwritable(err) from None

    def load(self) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """The saved state and ledger; empty ones when nothing was saved yet or the file was
        corrupt (then it is moved aside)."""
        tensors, ledger, _ = self._load()
        return tensors, ledger

    def latest(self) -> dict[str, torch.Tensor]:
        """The newest state: the pending round's when there is one, else the saved one."""
        pending = self._pending()
        return pending.tensors if pending is not None else self.load()[0]

    def consumed(self) -> list[dict]:
        """Every file consumed so far: the ledger, then those of the round still pending
        (marked ``"pending": True``)."""
        _, ledger, _ = self._load()
        pending = self._pending()
        if pending is None:
            return ledger
        known = {(e["name"], e["sha256"]) for e in ledger}
        return ledger + [{**e, "pending": True} for e in pending.ledger if (e["name"], e["sha256"]) not in known]

    @contextlib.contextmanager
    def round_lock(self) -> Iterator[None]:
        """Held for a whole round: one round at a time works on this state (a ClientApp that
        hung and came back must not write over a newer round's state)."""
        with open(self.folder / LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def begin_round(self, receipt: Receipt, new_run: str = "fresh",
                    server_round: int | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """The state and ledger a round of ``receipt``'s run starts from: the pending round
        committed or dropped as the receipt says, and the state bound to the run (see the
        module docstring for ``new_run``). A message of an older round than the pending one
        (delivered late) is refused: it would undo a newer round."""
        if new_run not in NEW_RUN_CHOICES:
            raise FedtideError(f"new-run {new_run!r} is not one of {', '.join(NEW_RUN_CHOICES)}")
        pending = self._pending()
        if pending is not None and server_round is not None and pending.run_uid == receipt.run_uid \
                and pending.server_round > server_round:
            raise FedtideError(
                f"round {server_round} is older than this client's last round {pending.server_round}: "
                "a late message, ignored"
            )
        if pending is not None:
            self._settle(pending, receipt)
        tensors, ledger, run_uid = self._load()
        if not run_uid or run_uid == receipt.run_uid or not (tensors or ledger):
            return tensors, ledger
        if new_run == "refuse":
            raise FedtideError(
                f"the client state in {self.folder} belongs to run {run_uid[:8]}, and the server now runs "
                f"{receipt.short_uid}: start the client with --new-run fresh (set the old state aside) or "
                "--new-run keep (carry it into the new run), or give it another --state folder"
            )
        if new_run == "keep":
            log.info("a new run (%s): this client carries its state of run %s into it", receipt.short_uid, run_uid[:8])
            return tensors, ledger
        aside = self._archive(run_uid)
        log.warning("a new run (%s): the state of run %s was moved to %s; starting clean, every file in the inbox "
                    "is new to this run", receipt.short_uid, run_uid[:8], aside)
        return {}, []

    def save_pending(self, tensors: dict[str, torch.Tensor], ledger: list[dict], server_round: int,
                     run_uid: str) -> None:
        """Write round ``server_round``'s outcome; it becomes the state once a receipt says the
        server kept it (``begin_round``)."""
        self._write(self.folder / PENDING_FILE, tensors, ledger, run_uid, {"round": str(int(server_round))})

    def note_run_end(self, receipt: Receipt, server_round: int) -> None:
        """Leave ``run-finished`` (the run's uid) once the run's last round was trained, for
        `fedtide client` to end with the run; any other round takes it away."""
        marker = self.folder / RUN_FINISHED_FILE
        if receipt.last_round and server_round >= receipt.last_round:
            marker.write_text(receipt.run_uid + "\n")
        else:
            marker.unlink(missing_ok=True)

    def _settle(self, pending: Pending, receipt: Receipt) -> None:
        """Commit ``pending`` when the receipt covers its round, else drop it."""
        pending_path = self.folder / PENDING_FILE
        if pending.run_uid == receipt.run_uid and pending.server_round <= receipt.aggregated_round:
            os.replace(pending_path, self.path)
            log.info("round %d reached the global model: its %d new file(s) are consumed",
                     pending.server_round, pending.new_files)
            return
        pending_path.unlink(missing_ok=True)
        if pending.run_uid == receipt.run_uid:
            log.warning("round %d's reply did not reach the global model (dropped, or the round is redone after a "
                        "server restart): its %d new file(s) are trained on again", pending.server_round,
                        pending.new_files)

    def _pending(self) -> Pending | None:
        """The pending round; None when there is none. A damaged pending file is deleted (its
        round is redone: nothing is lost)."""
        pending_path = self.folder / PENDING_FILE
        if not pending_path.exists():
            return None
        try:
            tensors, ledger, metadata = _read(pending_path)
            return Pending(int(metadata["round"]), metadata.get("run-uid", ""), tensors, ledger)
        except (OSError, SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as err:
            log.warning("the pending round's file %s was damaged (%s): deleted; its files are trained on again",
                        pending_path, err)
            pending_path.unlink(missing_ok=True)
            return None

    def _archive(self, run_uid: str) -> Path:
        folder = self.folder / PREVIOUS_RUNS
        folder.mkdir(mode=0o700, exist_ok=True)
        aside = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-run-{run_uid[:16]}.safetensors"
        os.replace(self.path, aside)
        for old in sorted(folder.glob("*-run-*.safetensors"))[:-KEEP_PREVIOUS]:
            old.unlink(missing_ok=True)
        return aside

    def _load(self) -> tuple[dict[str, torch.Tensor], list[dict], str]:
        if not self.path.exists():
            return {}, [], ""
        try:
            tensors, ledger, metadata = _read(self.path)
            return tensors, ledger, metadata.get("run-uid", "")
        except OSError as err:
            raise FedtideError(
                f"cannot read the client state {self.path} ({err.strerror or err}): "
                "check the file's permissions or move it away to start the client clean"
            ) from None
        except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as err:
            aside = self._move_aside()
            log.warning("client state %s was corrupt (%s): moved to %s; starting with no memory", self.path, err, aside)
            return {}, [], ""

    def save(self, tensors: dict[str, torch.Tensor], ledger: list[dict], run_uid: str = "") -> None:
        """Replace the saved state and ledger together, atomically (for a server that sends
        no receipts: its files count as consumed at once)."""
        self._write(self.path, tensors, ledger, run_uid)

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], ledger: list[dict], run_uid: str,
               extra: dict[str, str] | None = None) -> None:
        ledger_json = json.dumps(ledger, sort_keys=True)
        metadata = {
            "format": FORMAT,
            "ledger": ledger_json,
            "ledger-sha256": hashlib.sha256(ledger_json.encode()).hexdigest(),
            "payload-sha256": payload_sha256(tensors),
            "run-uid": run_uid,
            **(extra or {}),
        }
        try:
            save_tensors_atomic(path, tensors, metadata, mode=PRIVATE)  # it holds the device's samples
        except OSError as err:
            raise self._unwritable(err) from None

    def _unwritable(self, err: OSError) -> FedtideError:
        return FedtideError(
            f"cannot write the client state folder {self.folder} ({err.strerror or err}): "
            "make it writable for this user or choose another state folder"
        )

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.replace(self.path, aside)
        except OSError as err:
            raise FedtideError(
                f"the client state {self.path} is corrupt and cannot be moved aside ({err.strerror or err}): "
                "delete it to start the client clean"
            ) from None
        return aside


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, str]]:
    """Raises ValueError (or SafetensorError) when the file is not a valid, intact state file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not a fedtide client state (format {metadata.get('format')!r})")
    ledger_json = metadata["ledger"]
    if hashlib.sha256(ledger_json.encode()).hexdigest() != metadata["ledger-sha256"]:
        raise ValueError("the ledger's checksum does not match")
    if payload_sha256(tensors) != metadata["payload-sha256"]:
        raise ValueError("the tensors' checksum does not match")
    ledger = json.loads(ledger_json)
    if not isinstance(ledger, list) or not all(
        isinstance(entry, dict) and all(isinstance(entry.get(k), kind) for k, kind in LEDGER_FIELDS.items())
        for entry in ledger
    ):
        raise ValueError("the ledger is not a list of consumed files")
    return tensors, ledger, metadata
