"""Checkpoints of a run, written after every completed round, so a crashed server loses no
finished work.

A checkpoint is two files in ``RUN_DIR/checkpoints/``: ``round-000012.safetensors`` (every
tensor: the global model, the strategy's server-optimizer state, each simulated node's
``context.state``, torch's and numpy's RNG states) and ``round-000012.json`` (the rest: round,
task, Python's ``random`` state, the drift response, the order of the tensors, and the sha256
of both files), plus the journal ``history.jsonl`` that all checkpoints share: one line per
finished round, appended (and synced) before the checkpoint of that round is written. A
checkpoint names how many journal lines are its history, with their byte count and sha256,
so that saving round N costs the same at round 10 as at round 10,000 (a history stored in
every checkpoint made a long run write quadratic bytes). The tensors file is written first
and the JSON last, each atomically, so a checkpoint whose JSON exists is complete; a damaged
one (bad checksum, truncated, unreadable, a journal that no longer holds its rounds) is
skipped for the one before it. The last ``KEEP`` are kept. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from common.errors import FedtideError
from common.files import append_synced, write_bytes_atomic, write_text_atomic

CHECKPOINT_FOLDER = "checkpoints"
JOURNAL = "history.jsonl"
KEEP = 3
FORMAT = 2
LEGACY_FORMAT = 1  # the history inside every checkpoint; still read, so older runs resume
_NAME = re.compile(r"^round-(\d{6})\.json$")


class JournalEntry(Protocol):
    def as_json(self) -> dict[str, Any]: ...


@dataclass
class Checkpoint:
    """Named tensors (``model/``, ``strategy/``, ``node/<id>/``, ``rng/`` prefixes) and
    JSON-able metadata; ``meta["order"]`` keeps each group's key order (safetensors sorts).
    ``journal``: the run's history so far, one entry per round, oldest first (entries with
    ``as_json()`` when saving; the loaded dicts after ``load``)."""

    server_round: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    journal: Sequence[Any] = field(default_factory=list)

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix/``, without it, in the order they were saved."""
        return {key: self.tensors[f"{prefix}/{key}"] for key in self.meta["order"].get(prefix, [])}

    @classmethod
    def build(
        cls, server_round: int, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any],
        journal: Sequence[JournalEntry] = (),
    ) -> "Checkpoint":
        tensors: dict[str, torch.Tensor] = {}
        order: dict[str, list[str]] = {}
        for prefix, group in groups.items():
            order[prefix] = list(group)
            for key, tensor in group.items():
                # clones: safetensors refuses tensors that share memory
                tensors[f"{prefix}/{key}"] = tensor.detach().to("cpu").clone().contiguous()
        return cls(server_round, tensors, {**meta, "round": server_round, "order": order}, journal)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """The checkpoints folder of one run folder."""

    def __init__(self, run_dir: Path, keep: int = KEEP) -> None:
        self.folder = Path(run_dir) / CHECKPOINT_FOLDER
        self.keep = keep
        self.journal_path = self.folder / JOURNAL
        self._journal_lines = 0  # what this store has written to the journal, or found valid there
        self._journal_bytes = 0
        self._journal_hash = hashlib.sha256()

    def _paths(self, server_round: int) -> tuple[Path, Path]:
        stem = self.folder / f"round-{server_round:06d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def meta_path(self, server_round: int) -> Path:
        """The JSON file of ``server_round``'s checkpoint (read it through ``load`` to have it checked)."""
        return self._paths(server_round)[1]

    def rounds(self) -> list[int]:
        """Rounds with a checkpoint JSON, newest first (not yet checked)."""
        if not self.folder.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.folder.iterdir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def save(self, checkpoint: Checkpoint) -> Path:
        from safetensors.torch import save

        journal = self._append_journal(checkpoint.journal)
        tensors_path, meta_path = self._paths(checkpoint.server_round)
        data = save(checkpoint.tensors, metadata={"format": str(FORMAT)})
        write_bytes_atomic(tensors_path, data)
        body = {
            **checkpoint.meta, "format": FORMAT, "tensors_sha256": _sha256(data), "tensors_bytes": len(data),
            "journal": journal,
        }
        text = json.dumps(body, sort_keys=True)
        write_text_atomic(meta_path, json.dumps({"sha256": _sha256(text.encode()), "checkpoint": body}) + "\n")
        self._prune()
        return meta_path

    def _append_journal(self, entries: Sequence[JournalEntry]) -> dict[str, Any]:
        """Append the entries this store has not written yet (normally one round's), synced
        to disk; return what a checkpoint records of the journal."""
        if len(entries) < self._journal_lines:
            raise ValueError(f"the history has {len(entries)} rounds, the journal already {self._journal_lines}")
        new = "".join(json.dumps(e.as_json()) + "\n" for e in entries[self._journal_lines :]).encode()
        if new or not self.journal_path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            append_synced(self.journal_path, new)
            self._journal_hash.update(new)
            self._journal_bytes += len(new)
            self._journal_lines = len(entries)
        return {"lines": self._journal_lines, "bytes": self._journal_bytes, "sha256": self._journal_hash.hexdigest()}

    def _read_journal(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The journal's first ``record["lines"]`` entries, checked against the checkpoint."""
        try:
            with self.journal_path.open("rb") as handle:
                data = handle.read(int(record["bytes"]))
        except OSError as err:
            raise ValueError(f"{JOURNAL} is unreadable ({err.strerror or err})") from None
        if len(data) != record["bytes"] or _sha256(data) != record["sha256"]:
            raise ValueError(f"{JOURNAL} no longer holds this checkpoint's {record['lines']} rounds (truncated or changed)")
        lines = data.decode("utf-8").splitlines()
        if len(lines) != record["lines"]:
            raise ValueError(f"{JOURNAL} holds {len(lines)} rounds where the checkpoint counts {record['lines']}")
        return [json.loads(line) for line in lines]

    def continue_after(self, checkpoint: Checkpoint) -> None:
        """Make the journal end where ``checkpoint``'s history ends (a crash may have left
        a round or a partial line after it), so that the run goes on from there."""
        record = checkpoint.meta["journal"]
        if record is None:  # a legacy checkpoint: its history starts the journal
            data = "".join(json.dumps(entry) + "\n" for entry in checkpoint.journal).encode()
            write_bytes_atomic(self.journal_path, data)
            self._journal_lines, self._journal_bytes = len(checkpoint.journal), len(data)
            self._journal_hash = hashlib.sha256(data)
            return
        with self.journal_path.open("r+b") as handle:
            handle.truncate(record["bytes"])
            handle.seek(0)
            data = handle.read()
            handle.flush()
            os.fsync(handle.fileno())
        self._journal_lines, self._journal_bytes = record["lines"], record["bytes"]
        self._journal_hash = hashlib.sha256(data)

    def clear(self) -> None:
        """Remove every checkpoint and the journal: a new run in this folder must not resume
        an older one."""
        for server_round in self.rounds():
            for path in self._paths(server_round):
                path.unlink(missing_ok=True)
        self.journal_path.unlink(missing_ok=True)
        self._journal_lines, self._journal_bytes, self._journal_hash = 0, 0, hashlib.sha256()

    def _prune(self) -> None:
        for server_round in self.rounds()[self.keep:]:
            for path in self._paths(server_round):
                path.unlink(missing_ok=True)

    def load(self, server_round: int) -> Checkpoint:
        """The checkpoint of ``server_round``; ValueError says why it cannot be used."""
        from safetensors.torch import load

        tensors_path, meta_path = self._paths(server_round)
        try:
            document = json.loads(meta_path.read_text(encoding="utf-8"))
            body = document["checkpoint"]
            text = json.dumps(body, sort_keys=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_path.name} is unreadable ({err})") from None
        if document.get("sha256") != _sha256(text.encode()):
            raise ValueError(f"{meta_path.name} fails its checksum")
        if body.get("format") not in (LEGACY_FORMAT, FORMAT):
            raise ValueError(
                f"{meta_path.name} has format {body.get('format')}, this fedtide reads {FORMAT}: "
                "resume it with the fedtide version that started it"
            )
        try:
            data = tensors_path.read_bytes()
        except OSError as err:
            raise ValueError(f"{tensors_path.name} is unreadable ({err.strerror or err})") from None
        if len(data) != body["tensors_bytes"] or _sha256(data) != body["tensors_sha256"]:
            raise ValueError(f"{tensors_path.name} fails its checksum (truncated or damaged)")
        if body["format"] == LEGACY_FORMAT:
            history = body["history"]
            body = {**body, "baseline": history["baseline"], "journal": None}
            return Checkpoint(int(body["round"]), load(data), body, list(history["rounds"]))
        return Checkpoint(int(body["round"]), load(data), body, self._read_journal(body["journal"]))

    def latest(self, warn: Callable[[str], None]) -> Checkpoint:
        """The newest usable checkpoint; each damaged newer one is reported with ``warn``.
        FedtideError when there is none."""
        rounds = self.rounds()
        if not rounds:
            raise FedtideError(
                f"{self.folder.parent} holds no checkpoints ({CHECKPOINT_FOLDER}/round-*.json): "
                "it is not a fedtide run folder, or its run stopped before its first round was evaluated"
            )
        problems = []
        for server_round in rounds:
            try:
                return self.load(server_round)
            except ValueError as err:
                problems.append(str(err))
                warn(f"checkpoint of round {server_round} is not usable: {err}; trying the one before")
        raise FedtideError(f"no usable checkpoint in {self.folder}: {'; '.join(problems)}")
