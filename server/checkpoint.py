"""Checkpoints of a run, written after every completed round, so a crashed server loses no
finished work.

A checkpoint is two files in ``RUN_DIR/checkpoints/``: ``round-000012.safetensors`` (every
tensor: the global model, the strategy's server-optimizer state, each simulated node's
``context.state``, torch's and numpy's RNG states) and ``round-000012.json`` (the rest: round,
task, run history, Python's ``random`` state, the drift response, the order of the tensors,
and the sha256 of both files). The tensors file is written first and the JSON last, each
atomically, so a checkpoint whose JSON exists is complete; a damaged one (bad checksum,
truncated, unreadable) is skipped for the one before it. The last ``KEEP`` are kept.
Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import FedtideError
from common.files import write_bytes_atomic, write_text_atomic

CHECKPOINT_FOLDER = "checkpoints"
KEEP = 3
FORMAT = 1
_NAME = re.compile(r"^round-(\d{6})\.json$")


@dataclass
class Checkpoint:
    """Named tensors (``model/``, ``strategy/``, ``node/<id>/``, ``rng/`` prefixes) and
    JSON-able metadata; ``meta["order"]`` keeps each group's key order (safetensors sorts)."""

    server_round: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix/``, without it, in the order they were saved."""
        return {key: self.tensors[f"{prefix}/{key}"] for key in self.meta["order"].get(prefix, [])}

    @classmethod
    def build(cls, server_round: int, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> "Checkpoint":
        tensors: dict[str, torch.Tensor] = {}
        order: dict[str, list[str]] = {}
        for prefix, group in groups.items():
            order[prefix] = list(group)
            for key, tensor in group.items():
                # clones: safetensors refuses tensors that share memory
                tensors[f"{prefix}/{key}"] = tensor.detach().to("cpu").clone().contiguous()
        return cls(server_round, tensors, {**meta, "round": server_round, "order": order})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """The checkpoints folder of one run folder."""

    def __init__(self, run_dir: Path, keep: int = KEEP) -> None:
        self.folder = Path(run_dir) / CHECKPOINT_FOLDER
        self.keep = keep

    def _paths(self, server_round: int) -> tuple[Path, Path]:
        stem = self.folder / f"round-{server_round:06d}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def rounds(self) -> list[int]:
        """Rounds with a checkpoint JSON, newest first (not yet checked)."""
        if not self.folder.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.folder.iterdir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def save(self, checkpoint: Checkpoint) -> Path:
        from safetensors.torch import save

        tensors_path, meta_path = self._paths(checkpoint.server_round)
        data = save(checkpoint.tensors, metadata={"format": str(FORMAT)})
        write_bytes_atomic(tensors_path, data)
        body = {**checkpoint.meta, "format": FORMAT, "tensors_sha256": _sha256(data), "tensors_bytes": len(data)}
        text = json.dumps(body, sort_keys=True)
        write_text_atomic(meta_path, json.dumps({"sha256": _sha256(text.encode()), "checkpoint": body}) + "\n")
        self._prune()
        return meta_path

    def clear(self) -> None:
        """Remove every checkpoint: a new run in this folder must not resume an older one."""
        for server_round in self.rounds():
            for path in self._paths(server_round):
                path.unlink(missing_ok=True)

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
        if body.get("format") != FORMAT:
            raise ValueError(f"{meta_path.name} has format {body.get('format')}, this fedtide reads {FORMAT}")
        try:
            data = tensors_path.read_bytes()
        except OSError as err:
            raise ValueError(f"{tensors_path.name} is unreadable ({err.strerror or err})") from None
        if len(data) != body["tensors_bytes"] or _sha256(data) != body["tensors_sha256"]:
            raise ValueError(f"{tensors_path.name} fails its checksum (truncated or damaged)")
        return Checkpoint(int(body["round"]), load(data), body)

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
