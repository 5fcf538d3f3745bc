"""One run at a time in a run folder: an exclusive ``flock`` on ``RUN_DIR/run.lock``.

Two processes that write the same run folder at once (two ``--resume`` of one run, a new run
over a running one) would interleave their rounds in metrics.jsonl and their checkpoints. The
process that runs (``fedtide simulate``, the ServerApp of ``fedtide server``) holds the lock for
the whole run; any other gets a FedtideError naming the holder's pid. The operating system
drops the lock when its holder exits, however it exits (SIGKILL too), so a lock is never left
behind stale; the file itself stays (deleting it would let two processes lock two files).

Within one process the lock is re-entrant: the command line holds it while it checks and
prepares the folder, and the run it then starts (perhaps in a thread, as Flower's simulation
engine does) holds it again.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.errors import FedtideError

LOCK_FILE = "run.lock"

_held: dict[Path, list[int]] = {}  # folder -> [descriptor holding its lock, holders in this process]
_guard = threading.Lock()


@contextmanager
def hold_run_folder(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock (the folder must exist) until the block ends; FedtideError when
    another process holds it or the lock file cannot be made."""
    key = Path(folder).resolve()
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_lock(key), 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                os.close(entry[0])  # closing the descriptor releases the lock


def _lock(folder: Path) -> int:
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise FedtideError(f"cannot lock the run folder {folder} ({err.strerror or err}): choose a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise FedtideError(
            f"{folder} is in use by another fedtide run (pid {holder}): wait until it ends, or stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
