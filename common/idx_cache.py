"""A cache of IDX files already decompressed and checked against their sha256.

Decompressing and hashing MNIST's four files costs about 0.2 s, a noticeable share of a
short simulation, and every run and every bench cell paid it again. After one verified
read, the decoded array is kept as ``<sha256>.npy`` in the cache folder, with a stamp of
the source file (resolved path, size, inode, modification and change time; the change time
is one no tool can set back). A later read of the same, unchanged source loads the array
instead; a source with any of these different is read and verified again. Whatever a stamp
says, an entry only ever holds content that matched its official sha256, and the folder is
private to the user (0700), so nobody else can plant one. About 110 MB for MNIST or
Fashion-MNIST. The cache is an optimisation only: when its folder cannot be written or
an entry cannot be read, reading goes the long way and nothing fails.

Folder: ``$FEDTIDE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedtide``, else ``~/.cache/fedtide``;
``FEDTIDE_CACHE_DIR=off`` turns the cache off.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from common.files import write_bytes_atomic

CACHE_ENV = "FEDTIDE_CACHE_DIR"


def cache_folder() -> Path | None:
    chosen = os.environ.get(CACHE_ENV, "")
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen) / "idx"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedtide" / "idx"


def _stamp(source: Path) -> dict[str, object]:
    stat = source.stat()
    return {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def load_cached(source: Path, sha256: str) -> np.ndarray | None:
    """The array once read and verified from ``source``, if ``source`` is unchanged since."""
    folder = cache_folder()
    if folder is None:
        return None
    try:
        stamp = json.loads((folder / f"{sha256}.json").read_text())
        if stamp != _stamp(source):
            return None
        return np.load(folder / f"{sha256}.npy", allow_pickle=False)
    except Exception:  # noqa: BLE001 - a damaged entry just means reading the long way
        return None


def store(source: Path, sha256: str, array: np.ndarray) -> None:
    """Keep ``array``, just verified against ``sha256``, for later reads of ``source``."""
    folder = cache_folder()
    if folder is None:
        return
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        write_bytes_atomic(folder / f"{sha256}.npy", buffer.getvalue())
        write_bytes_atomic(folder / f"{sha256}.json", json.dumps(_stamp(source)).encode())  # last: marks it complete
    except OSError:
        pass
