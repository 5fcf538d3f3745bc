"""Atomic file writes: write to a temp file in the same folder, fsync, rename.

A reader (or a crash) never sees a half-written file. Weights go to safetensors,
metadata to JSON; nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from common.errors import FedtideError

if TYPE_CHECKING:  # torch loads only when tensors are saved or loaded: the CLI starts fast
    import torch


def ensure_writable_folder(path: Path, what: str = "the run folder", flag: str = "--out") -> Path:
    """Create ``path`` if needed and prove a file can be written there, or raise FedtideError
    naming ``what`` it is and the ``flag`` that chooses it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise FedtideError(
            f"cannot write {what} {path} ({err.strerror or err}): choose a writable folder with {flag}"
        ) from None
    return path


def write_bytes_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data``; the file has permission bits ``mode`` from the start
    (0o600 for a private key or a client's data: never readable by others, not even
    briefly), or by default those of a new file under the process's umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _new_file_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_synced(path: Path, data: bytes, mode: int = 0o666, sync: bool = True) -> None:
    """Append ``data`` to ``path`` (created if missing, with permission bits ``mode`` less
    the umask) and have it on disk before returning; ``sync=False`` leaves that to the system
    (about 4 ms less, for a copy whose loss in a power cut can be afforded)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    with os.fdopen(fd, "ab") as handle:
        handle.write(data)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())


def _new_file_mode() -> int:
    """0o666 less the umask, as ``open`` would create a file (read from /proc: setting the
    umask to read it back is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors_atomic(
    path: Path, tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str] | None = None,
    mode: int | None = None,
) -> None:
    """Save named tensors as safetensors (contiguous CPU copies), atomically (``mode``: see
    ``write_bytes_atomic``)."""
    from safetensors.torch import save

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    write_bytes_atomic(path, save(cpu, metadata=dict(metadata or {})), mode=mode)


def load_tensors(path: Path) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    return load_file(str(path))
