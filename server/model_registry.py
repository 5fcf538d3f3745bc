"""The run folder's model registry: each round's candidate, the numbered released versions,
which one devices are served, and the log of every decision.

``RUN_DIR/models/``:
- ``registry.json``: the released versions (round, task, sha256, accuracies, how released),
  which one is released now, whether releases are automatic, and the newest candidate;
- ``candidate.safetensors``: the newest round's global model (what ``fedtide models release``
  releases when told to);
- ``v0001.safetensors`` ...: each released version's weights (the newest ``keep`` of them);
- ``decisions.jsonl``: one line per round (the gate's decision with its numbers) and per
  operator action.

The server and ``fedtide models`` (run by an operator while the server runs) both change the
registry, each under ``registry.lock`` (a short exclusive ``flock``) with a fresh read first:
a rollback made while the server runs is what the next round serves. A version's weights are
named by their digest (``common.weights.weights_digest``), checked whenever they are read:
released, rolled back and served weights are bit-exact or refused.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from common.errors import FedtideError
from common.files import (
    append_synced, load_tensors, save_tensors_atomic, write_bytes_atomic, write_json_atomic, write_text_atomic,
)
from common.weights import weights_digest

MODELS_FOLDER = "models"
REGISTRY_FILE, DECISIONS_FILE, CANDIDATE_FILE, LOCK_FILE = (
    "registry.json", "decisions.jsonl", "candidate.safetensors", "registry.lock")
MAX_REGISTRY_BYTES = 64 * 2**20  # a registry.json larger than this is not one fedtide wrote
FILE_NAME = re.compile(r"v\d{4,12}\.(safetensors|pt|onnx)")  # the only files a registry names: never a path
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Registry:
    """What ``registry.json`` holds. ``released``: the version devices are served (None before
    the first release); ``auto``: whether the server releases on its own (a rollback pauses it
    until an operator releases again)."""

    versions: list[dict[str, Any]] = field(default_factory=list)
    released: int | None = None
    auto: bool = True
    candidate: dict[str, Any] | None = None
    last_number: int = 0  # the highest version number ever given: never given again, even after a resume
    keep: int | None = None  # the run's --keep-releases, so that an operator's release prunes alike

    def version(self, number: int) -> dict[str, Any]:
        for entry in self.versions:
            if entry["version"] == number:
                return entry
        known = ", ".join(str(v["version"]) for v in self.versions) or "none yet"
        raise FedtideError(f"there is no released version {number} (released versions: {known})")

    @property
    def current(self) -> dict[str, Any] | None:
        return None if self.released is None else self.version(self.released)


class ModelRegistry:
    """The registry of the run in ``run_dir``. Read and change it inside ``with registry.open()``."""

    def __init__(self, run_dir: Path, keep: int = 20) -> None:
        self.folder = Path(run_dir) / MODELS_FOLDER
        self.keep = keep

    def exists(self) -> bool:
        return (self.folder / REGISTRY_FILE).is_file()

    @contextmanager
    def open(self, create: bool = False, write: bool = True) -> Iterator[Registry]:
        """The registry, read under its lock; what the block changes is written when it ends
        (nothing is written when it raises). FedtideError when there is none and not ``create``.
        ``write=False`` only reads (under a shared lock when the folder lets one be taken), so
        an operator can list a run folder that is not theirs to change."""
        if not create and not self.exists():
            raise FedtideError(f"{self.folder.parent} has no model registry ({MODELS_FOLDER}/{REGISTRY_FILE}): give a "
                               "run folder written by `fedtide simulate` or `fedtide server`")
        try:
            if write:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            else:
                fd = os.open(self.folder / LOCK_FILE, os.O_RDONLY) if (self.folder / LOCK_FILE).exists() else -1
        except OSError as err:
            raise FedtideError(f"cannot lock {self.folder} ({err.strerror or err}): "
                               + ("run this as the run folder's owner" if write else "check its permissions")) from None
        try:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            registry = self._read()
            before = json.dumps(_as_json(registry), sort_keys=True)
            yield registry
            if write and (json.dumps(_as_json(registry), sort_keys=True) != before or not self.exists()):
                write_json_atomic(self.folder / REGISTRY_FILE, _as_json(registry))
        finally:
            if fd >= 0:
                os.close(fd)

    def _read(self) -> Registry:
        path = self.folder / REGISTRY_FILE
        if not path.is_file():
            return Registry()
        try:
            if path.stat().st_size > MAX_REGISTRY_BYTES:
                raise ValueError(f"larger than {MAX_REGISTRY_BYTES // 2**20} MiB")
            data = json.loads(path.read_text(encoding="utf-8"))
            registry = Registry(versions=list(data["versions"]), released=data["released"], auto=bool(data["auto"]),
                                candidate=data.get("candidate"), last_number=int(data.get("last_number", 0)),
                                keep=data.get("keep"))
            for entry in registry.versions:
                _check_entry(entry, versioned=True)
            if registry.candidate is not None:
                _check_entry(registry.candidate, versioned=False)
            registry.last_number = max([registry.last_number] + [v["version"] for v in registry.versions])
            if registry.released is not None:
                registry.version(int(registry.released))
            if registry.keep is not None and not (isinstance(registry.keep, int) and registry.keep >= 1):
                raise ValueError("keep must be a whole number >= 1")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, FedtideError) as err:
            raise FedtideError(f"{path} is damaged ({str(err)[:80]}): restore it from a backup, or start a new run") from None
        return registry

    # ---- the server's steps --------------------------------------------------
    def put_candidate(self, registry: Registry, weights: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, Any]:
        """Keep ``weights`` as the newest candidate; ``record`` (round, task, seen, accuracies)
        gets its sha256. Returns the record."""
        record = {**record, "sha256": weights_digest(weights)}
        save_tensors_atomic(self.folder / CANDIDATE_FILE, weights, metadata={"sha256": record["sha256"]})
        registry.candidate = record
        return record

    def release_candidate(self, registry: Registry, how: str, note: str = "") -> dict[str, Any]:
        """Release the newest candidate as the next version (its weights copied, checked
        against their digest); older versions beyond ``keep`` lose their weights file. Weights
        released before are not a new version: that version is served again."""
        if registry.candidate is None:
            raise FedtideError(f"{self.folder.parent} has no candidate yet: a run releases a model once a round has ended")
        candidate = registry.candidate
        self._checked_weights(self.folder / CANDIDATE_FILE, candidate["sha256"])
        same = [v for v in registry.versions if v["sha256"] == candidate["sha256"] and v.get("file")]
        if same:  # these weights were released before (e.g. a round that kept the model): serve that version
            registry.released = same[-1]["version"]
            return same[-1]
        number = registry.last_number + 1
        name = f"v{number:04d}.safetensors"
        write_bytes_atomic(self.folder / name, (self.folder / CANDIDATE_FILE).read_bytes())
        registry.last_number = number
        entry = {**candidate, "version": number, "file": name, "how": how, "time": time.time(),
                 **({"note": note} if note else {})}
        registry.versions.append(entry)
        registry.released = number
        self._prune(registry)
        return entry

    def _prune(self, registry: Registry) -> None:
        """Only the newest ``keep`` versions (the run's, as recorded) and the released one keep
        their weights."""
        if registry.keep is None:
            registry.keep = self.keep
        kept = {v["version"] for v in registry.versions[-registry.keep:]} | {registry.released}
        for entry in registry.versions:
            if entry["version"] not in kept and entry.get("file"):
                (self.folder / entry["file"]).unlink(missing_ok=True)
                entry["file"] = None
                if entry.get("export", {}).get("file"):
                    (self.folder / entry["export"]["file"]).unlink(missing_ok=True)
                    entry["export"]["file"] = None

    def log(self, line: dict[str, Any]) -> None:
        append_synced(self.folder / DECISIONS_FILE, (json.dumps(line) + "\n").encode())

    def decisions(self) -> list[dict[str, Any]]:
        path = self.folder / DECISIONS_FILE
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
        return out

    # ---- an operator's steps ---------------------------------------------------
    def rollback(self, registry: Registry, to: int | None = None) -> dict[str, Any]:
        """Serve version ``to`` (default: the one released before the current one) and pause
        automatic releases. FedtideError when there is nothing to go back to, or its weights
        are gone or damaged."""
        if registry.released is None:
            raise FedtideError(f"{self.folder.parent} has released no model yet: there is nothing to roll back")
        if to is None:
            older = [v["version"] for v in registry.versions if v["version"] < registry.released]
            if not older:
                raise FedtideError(f"version {registry.released} is the first release: there is no earlier one to roll back to")
            to = older[-1]
        entry = registry.version(to)
        self.weights(entry)  # refuse a version whose weights are gone or damaged before serving it
        registry.released, registry.auto = to, False
        return entry

    def weights(self, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A released version's weights, checked against its sha256."""
        if not entry.get("file"):
            raise FedtideError(f"version {entry['version']}'s weights were removed (only the newest --keep-releases "
                               "versions keep them): choose a newer version")
        return self._checked_weights(self.folder / entry["file"], entry["sha256"])

    def _checked_weights(self, path: Path, sha256: str) -> dict[str, torch.Tensor]:
        try:
            weights = load_tensors(path)
        except (OSError, SafetensorError, ValueError) as err:
            raise FedtideError(f"{path} cannot be read ({str(err)[:80]}): that model is lost") from None
        if weights_digest(weights) != sha256:
            raise FedtideError(f"{path} does not match its recorded sha256: the file was changed or damaged")
        return weights

    # ---- the run's life --------------------------------------------------------
    def keep_rounds_until(self, last_round: int) -> None:
        """A resumed run redoes the rounds after ``last_round``: forget what they released
        and decided (the operator's actions stay), so that they are decided again."""
        if not self.exists():
            return
        with self.open() as registry:
            dropped = {v["version"] for v in registry.versions if v["how"] != "operator" and v["round"] > last_round}
            for entry in registry.versions:
                if entry["version"] in dropped:
                    for name in (entry.get("file"), entry.get("export", {}).get("file")):
                        if name:
                            (self.folder / name).unlink(missing_ok=True)
            registry.versions = [v for v in registry.versions if v["version"] not in dropped]
            if registry.released in dropped:  # the newest version that still has its weights
                served = [v["version"] for v in registry.versions if v.get("file")]
                registry.released = served[-1] if served else None
            if registry.candidate is not None and registry.candidate["round"] > last_round:
                registry.candidate = None
            kept = [d for d in self.decisions() if d.get("operator") or d.get("round", 0) <= last_round]
            write_text_atomic(self.folder / DECISIONS_FILE, "".join(json.dumps(d) + "\n" for d in kept))

    def clear(self) -> None:
        """Remove the registry (a new run in this folder starts its own)."""
        if self.folder.is_dir():
            shutil.rmtree(self.folder)


def _as_json(registry: Registry) -> dict[str, Any]:
    return {"versions": registry.versions, "released": registry.released, "auto": registry.auto,
            "candidate": registry.candidate, "last_number": registry.last_number, "keep": registry.keep}


def _check_entry(entry: dict[str, Any], versioned: bool) -> None:
    """ValueError naming the first field of a version (or candidate) record that is not what
    fedtide writes: files are bare names of the registry's own kinds, never paths."""
    if not isinstance(entry, dict):
        raise ValueError("a version record is not an object")
    if versioned and not (isinstance(entry.get("version"), int) and entry["version"] >= 1
                          and isinstance(entry.get("how"), str)):
        raise ValueError("a version number is not a whole number >= 1, or it does not say how it was released")
    if not (isinstance(entry.get("round"), int) and isinstance(entry.get("task"), int) and entry["task"] >= 0):
        raise ValueError("a record's round or task is not a whole number")
    if not (isinstance(entry.get("sha256"), str) and SHA256.fullmatch(entry["sha256"])):
        raise ValueError("a record's sha256 is not 64 hex digits")
    accuracies = entry.get("accuracies")
    if not (isinstance(accuracies, list) and len(accuracies) > entry["task"]
            and all(isinstance(a, (int, float)) and (math.isnan(a) or 0 <= a <= 1) for a in accuracies)):
        raise ValueError("a record's accuracies are not fractions, one per task")
    names = [entry.get("file"), (entry.get("export") or {}).get("file")] if versioned else []
    if any(name is not None and not (isinstance(name, str) and FILE_NAME.fullmatch(name)) for name in names):
        raise ValueError("a record names a file that is not one of the registry's own")
