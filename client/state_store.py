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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.errors import FedtideError
from common.files import save_tensors_atomic

STATE_FILE = "state.safetensors"
PRIVATE = 0o600
FORMAT = "fedtide-client-state/1"
LEDGER_FIELDS = {"name": str, "size": int, "sha256": str}

log = logging.getLogger("fedtide.client")


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
        if not self.path.exists():
            return {}, []
        try:
            return _read(self.path)
        except OSError as err:
            raise FedtideError(
                f"cannot read the client state {self.path} ({err.strerror or err}): "
                "check the file's permissions or move it away to start the client clean"
            ) from None
        except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as err:
            aside = self._move_aside()
            log.warning("client state %s was corrupt (%s): moved to %s; starting with no memory", self.path, err, aside)
            return {}, []

    def save(self, tensors: dict[str, torch.Tensor], ledger: list[dict]) -> None:
        """Replace the saved state and ledger together, atomically."""
        ledger_json = json.dumps(ledger, sort_keys=True)
        metadata = {
            "format": FORMAT,
            "ledger": ledger_json,
            "ledger-sha256": hashlib.sha256(ledger_json.encode()).hexdigest(),
            "payload-sha256": payload_sha256(tensors),
        }
        try:
            save_tensors_atomic(self.path, tensors, metadata, mode=PRIVATE)  # it holds the device's samples
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


def _read(path: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
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
    return tensors, ledger
