"""The inbox: a folder on the edge device where new training data arrives as files.

Convention for whoever writes into the inbox:

- A data file is either ``*.npz`` with two arrays, ``x`` (features) and ``y`` (labels), saved
  with ``numpy.savez`` and no Python objects (nothing is ever unpickled), or ``*.csv`` with a
  header row, one column named ``label`` and every other column a feature, in order, values
  unquoted.
- Only complete files are read: write to a temporary name, then rename into place. Names
  starting with ``.`` or ending in ``.tmp``, ``.part`` or ``.partial`` are skipped until they
  are renamed, as are folders. Files with other endings are left alone.
- ``x`` holds one sample per row: ``[N, *input_shape]``, flat ``[N, prod(input_shape)]``, or
  ``[N, H, W]`` for one-channel images. ``uint8`` values are pixels, scaled by 1/255; float
  values (and every CSV value) are used as they are and must lie in the deployment's feature
  range (``fedtide client --feature-range``, default [0, 1]: the pixel range of fedtide's
  datasets). Labels are whole numbers ``0 .. num_classes-1``.
- A file is at most 64 MiB and holds at most 2**24 values (``client.inbox_files`` has the
  limits and why).
- Files are read in the order they arrived: by modification time, then by name. A round
  reads files until it holds ``ROUND_VALUES`` values; the rest wait for the next round.
- A file that breaks these rules is moved to ``<inbox>/quarantine/`` with
  ``<name>.reason.txt`` (mode 0600) beside it saying what was wrong; the round trains on the
  other files. So is a symbolic link (links are never followed: the link itself is moved),
  or a file with other hard links (it may be a file outside the inbox). A reason never
  quotes the file. When ``quarantine`` is a link or not a folder, nothing is written there:
  the bad files stay where they are and the client says so in its log each round.
- A file is identified by name, size and the sha256 of its bytes. The client keeps a ledger
  of what it consumed, so a file is trained on once however often it is listed; consumed files
  may stay or be removed. A file with a consumed file's name but other content is new data
  (an updated file is a new delivery), and so is a copy under a new name.
- File names are logged as Python literals (``repr``), so a name cannot forge a log line.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from client.feature_range import DEFAULT_FEATURE_RANGE
from client.inbox_files import MAX_FILE_BYTES, MAX_VALUES, BadFile, parse_data_file, validate_samples
from common.datasets import LabelledSplit

__all__ = ["Arrivals", "ArrivedFile", "BadFile", "QUARANTINE", "collect_arrivals", "parse_data_file", "shown",
           "validate_samples"]

QUARANTINE = "quarantine"
REASON_SUFFIX = ".reason.txt"
DATA_SUFFIXES = (".npz", ".csv")
UNFINISHED_SUFFIXES = (".tmp", ".part", ".partial")
ROUND_VALUES = 2 * MAX_VALUES  # a round holds at most this plus one file: 192 MiB of float32 samples
MAX_REASON_CHARS = 300
SYMLINK = "a symbolic link: links are never followed; put the file itself in the inbox"
NAME_MAX = 255  # bytes in one file name (Linux, macOS)

log = logging.getLogger("fedtide.client")


@dataclass(frozen=True)
class ArrivedFile:
    """One valid, not yet consumed file and its samples."""

    name: str
    size: int
    sha256: str
    data: LabelledSplit
    mtime_ns: int = 0  # when it was last written: an unchanged consumed file is not read again

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.name, self.size, self.sha256)


@dataclass(frozen=True)
class Arrivals:
    files: list[ArrivedFile]  # in arrival order
    quarantined: list[str]  # names of the files found bad this time (moved to quarantine if it is safe)

    @property
    def data(self) -> LabelledSplit | None:
        """All new samples, file after file; None when no new file arrived."""
        if not self.files:
            return None
        return LabelledSplit(torch.cat([f.data.x for f in self.files]), torch.cat([f.data.y for f in self.files]))


def shown(name: str) -> str:
    """A file name as it may appear in a log line or a message: a Python literal (control
    characters, newlines, undecodable bytes escaped), cut to about 80 characters."""
    return repr(name) if len(name) <= 80 else repr(name[:77]) + "..."


def collect_arrivals(
    inbox: Path, input_shape: tuple[int, ...], num_classes: int, consumed: Iterable[dict],
    feature_range: tuple[float, float] = DEFAULT_FEATURE_RANGE,
) -> Arrivals:
    """Read every complete data file in ``inbox`` that is not in ``consumed`` (ledger entries
    with ``name``, ``size``, ``sha256``); quarantine the bad ones. Never raises for a file,
    whatever it holds; a missing inbox is an empty one."""
    try:
        folder = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the user's choice: may be a link
    except (FileNotFoundError, NotADirectoryError):
        return Arrivals([], [])
    try:
        return _collect(folder, input_shape, num_classes, list(consumed), feature_range)
    finally:
        os.close(folder)


def _collect(folder: int, input_shape: tuple[int, ...], num_classes: int, consumed: list[dict],
             feature_range: tuple[float, float]) -> Arrivals:
    seen = {(e["name"], e["size"], e["sha256"]) for e in consumed}
    untouched = {(e["name"], e["size"], e["mtime_ns"]) for e in consumed if "mtime_ns" in e}
    files, bad, values = [], [], 0
    for name, size, mtime_ns, problem in _complete_files(folder):
        if (name, size, mtime_ns) in untouched:
            continue  # consumed and not written since: no need to read and hash it again
        if values >= ROUND_VALUES and not problem:
            log.info("this round holds %d samples already; %s waits for the next round", sum(len(f.data) for f in files), shown(name))
            continue
        try:
            if problem:
                raise BadFile(problem)
            raw = _read_unfollowed(folder, name)
            key = (name, len(raw), hashlib.sha256(raw).hexdigest())
            if key in seen:
                continue
            data = parse_data_file(name, raw, input_shape, num_classes, feature_range)
        except FileNotFoundError:
            continue  # removed since it was listed
        except OSError as err:
            log.warning("cannot read %s (%s); it stays in the inbox and is tried again next round",
                        shown(name), err.strerror or type(err).__name__)
            continue
        except BadFile as err:
            bad.append(name)
            _quarantine(folder, name, str(err))
            continue
        except Exception as err:  # whatever a parser raises on hostile bytes (its message may quote them)
            bad.append(name)
            _quarantine(folder, name, f"could not be read as data ({type(err).__name__})")
            continue
        values += data.x.numel()
        files.append(ArrivedFile(*key, data=data, mtime_ns=mtime_ns))
    return Arrivals(files, bad)


def _complete_files(folder: int) -> list[tuple[str, int, int, str]]:
    """Data files that are finished, oldest first (modification time, then name): name, size,
    modification time in ns, and why it is refused unread ('' when it is to be read).
    Nothing is followed: a link is listed as a link, whatever it points to."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.lower().endswith(UNFINISHED_SUFFIXES):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                continue
            if not name.lower().endswith(DATA_SUFFIXES):
                log.info("ignoring %s in the inbox: only .npz and .csv files are data", shown(name))
                continue
            found.append((info.st_mtime_ns, name, info.st_size, _refusal(info)))
    return [(name, size, mtime_ns, problem) for mtime_ns, name, size, problem in sorted(found)]


def _refusal(info: os.stat_result) -> str:
    """Why a file with this ``lstat`` (or ``fstat``) is refused before a byte is read; '' if not."""
    if stat.S_ISLNK(info.st_mode):
        return SYMLINK
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_nlink > 1:
        return "has other hard links (it may be a file outside the inbox): put a copy of the file in the inbox"
    if info.st_size > MAX_FILE_BYTES:
        return f"larger than {MAX_FILE_BYTES // 2**20} MiB: split it into several files"
    return ""


def _read_unfollowed(folder: int, name: str) -> bytes:
    """The bytes of ``name`` in ``folder``, opened without following a link (it may have been
    swapped for one since it was listed) nor blocking on a pipe; BadFile as ``_refusal``,
    OSError when it changes while it is read (still being written: tried again next round)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=folder)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise BadFile(SYMLINK) from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        problem = _refusal(info)
        if problem:
            raise BadFile(problem)
        raw = handle.read(info.st_size + 1)
    if len(raw) != info.st_size:
        raise InterruptedError(errno.EAGAIN, "it changed while it was read")
    return raw


def _quarantine(folder: int, name: str, reason: str) -> str | None:
    """Move ``name`` (a file or a link itself, never what a link points to) into the inbox's
    quarantine folder under a free name (``a.npz``, ``a-1.npz``, ...) and write the reason
    beside it, readable by the owner only. Returns the new name, or None when nothing was
    moved (logged): the quarantine is a link or not a folder, or the move failed."""
    reason = reason[:MAX_REASON_CHARS]
    try:
        quarantine = _open_quarantine(folder)
    except OSError as err:
        log.error("%s is not valid data (%s); it stays in the inbox: %s", shown(name), reason, err.strerror or err)
        return None
    try:
        target = _free_name(quarantine, name)
        os.rename(name, target, src_dir_fd=folder, dst_dir_fd=quarantine)
        _write_private(quarantine, target + REASON_SUFFIX, reason + "\n")
    except OSError as err:
        log.error("%s is not valid data (%s) and could not be quarantined: %s", shown(name), reason,
                  err.strerror or type(err).__name__)
        return None
    finally:
        os.close(quarantine)
    log.warning("quarantined %s: %s (see %s/)", shown(name), reason, QUARANTINE)
    return target


def _open_quarantine(folder: int) -> int:
    """The quarantine folder of the inbox ``folder``, made (0700) if missing. OSError when it
    is a link or not a folder: nothing is ever written through a link."""
    try:
        os.mkdir(QUARANTINE, 0o700, dir_fd=folder)
    except FileExistsError:
        pass
    try:
        return os.open(QUARANTINE, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(err.errno, f"{QUARANTINE}/ is a link or not a folder: remove it and a folder is made") from None
        raise


def _free_name(quarantine: int, name: str) -> str:
    """A name not taken in ``quarantine``, short enough to take the reason suffix."""
    stem, dot, suffix = name.rpartition(".")
    stem, suffix = (stem, dot + suffix) if dot else (name, "")
    room = NAME_MAX - len(REASON_SUFFIX) - len(os.fsencode(suffix)) - 6
    stem = os.fsdecode(os.fsencode(stem)[:room])
    for n in range(10_000):
        candidate = f"{stem}-{n}{suffix}" if n else f"{stem}{suffix}"
        if not _exists(candidate, quarantine) and not _exists(candidate + REASON_SUFFIX, quarantine):
            return candidate
    raise OSError(0, "no free name in the quarantine folder")


def _exists(name: str, folder: int) -> bool:
    try:
        os.lstat(name, dir_fd=folder)
    except FileNotFoundError:
        return False
    return True


def _write_private(folder: int, name: str, text: str) -> None:
    """Replace ``name`` in ``folder`` atomically (temp file, fsync, rename) with ``text``,
    mode 0600, never through a link."""
    tmp = f".reason-{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, 0o600)
            handle.write(text.encode("utf-8", "backslashreplace"))
            handle.flush()
            os.fsync(fd)
        os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        os.unlink(tmp, dir_fd=folder)
        raise

