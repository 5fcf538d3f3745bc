"""Atomic file writes: write to a temp file in the same folder, fsync, rename.

A reader (or a crash) never sees a half-written file. Weights go to safetensors,
metadata to JSON; nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors_atomic(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save named tensors as safetensors (contiguous CPU copies), atomically."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    write_bytes_atomic(path, save(cpu, metadata=dict(metadata or {})))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
