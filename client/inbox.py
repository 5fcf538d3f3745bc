"""The inbox: a folder on the edge device where new training data arrives as files.

Convention for whoever writes into the inbox:

- A data file is either ``*.npz`` with two arrays, ``x`` (features) and ``y`` (labels), saved
  with ``numpy.savez`` and no Python objects (nothing is ever unpickled), or ``*.csv`` with a
  header row, one column named ``label`` and every other column a feature, in order.
- Only complete files are read: write to a temporary name, then rename into place. Names
  starting with ``.`` or ending in ``.tmp``, ``.part`` or ``.partial`` are skipped until they
  are renamed, as are folders. Files with other endings are left alone.
- ``x`` holds one sample per row: ``[N, *input_shape]``, flat ``[N, prod(input_shape)]``, or
  ``[N, H, W]`` for one-channel images. ``uint8`` values are pixels, scaled by 1/255; float
  values (and every CSV value) are used as they are. Labels are whole numbers
  ``0 .. num_classes-1``.
- Files are read in the order they arrived: by modification time, then by name.
- A file that breaks these rules is moved to ``<inbox>/quarantine/`` with
  ``<name>.reason.txt`` beside it saying what was wrong; the round trains on the other files.
- A file is identified by name, size and the sha256 of its bytes. The client keeps a ledger
  of what it consumed, so a file is trained on once however often it is listed; consumed files
  may stay or be removed. A file with a consumed file's name but other content is new data
  (an updated file is a new delivery), and so is a copy under a new name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from common.datasets import LabelledSplit
from common.files import write_text_atomic

QUARANTINE = "quarantine"
DATA_SUFFIXES = (".npz", ".csv")
UNFINISHED_SUFFIXES = (".tmp", ".part", ".partial")
LABEL_COLUMN = "label"

log = logging.getLogger("fedtide.client")


class BadFile(Exception):
    """A data file that breaks the inbox convention; the message is the reason."""


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
    quarantined: list[str]  # names of the files moved to quarantine this time

    @property
    def data(self) -> LabelledSplit | None:
        """All new samples, file after file; None when no new file arrived."""
        if not self.files:
            return None
        return LabelledSplit(torch.cat([f.data.x for f in self.files]), torch.cat([f.data.y for f in self.files]))


def collect_arrivals(
    inbox: Path, input_shape: tuple[int, ...], num_classes: int, consumed: Iterable[dict]
) -> Arrivals:
    """Read every complete data file in ``inbox`` that is not in ``consumed`` (ledger entries
    with ``name``, ``size``, ``sha256``); quarantine the bad ones. Never raises for a bad file;
    a missing inbox is an empty one."""
    inbox = Path(inbox)
    consumed = list(consumed)
    seen = {(e["name"], e["size"], e["sha256"]) for e in consumed}
    untouched = {(e["name"], e["size"], e["mtime_ns"]) for e in consumed if "mtime_ns" in e}
    files, quarantined = [], []
    for path, size, mtime_ns in _complete_files(inbox):
        if (path.name, size, mtime_ns) in untouched:
            continue  # consumed and not written since: no need to read and hash it again
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue  # removed since it was listed
        except OSError as err:
            log.warning("cannot read %s (%s); it stays in the inbox and is tried again next round", path, err)
            continue
        key = (path.name, len(raw), hashlib.sha256(raw).hexdigest())
        if key in seen:
            continue
        try:
            data = parse_data_file(path.name, raw, input_shape, num_classes)
        except BadFile as err:
            quarantine(inbox, path, str(err))
            quarantined.append(path.name)
            continue
        files.append(ArrivedFile(*key, data=data, mtime_ns=mtime_ns))
    return Arrivals(files, quarantined)


def _complete_files(inbox: Path) -> list[tuple[Path, int, int]]:
    """Data files that are finished, oldest first (modification time, then name), with their
    size and modification time in ns."""
    if not inbox.is_dir():
        return []
    found = []
    for entry in os.scandir(inbox):
        name = entry.name
        if name.startswith(".") or name.lower().endswith(UNFINISHED_SUFFIXES) or not entry.is_file():
            continue
        if not name.lower().endswith(DATA_SUFFIXES):
            log.info("ignoring %s in the inbox: only .npz and .csv files are data", name)
            continue
        try:
            stat = entry.stat()
        except FileNotFoundError:
            continue
        found.append((stat.st_mtime_ns, name, stat.st_size))
    return [(inbox / name, size, mtime_ns) for mtime_ns, name, size in sorted(found)]


def quarantine(inbox: Path, path: Path, reason: str) -> Path | None:
    """Move ``path`` to ``<inbox>/quarantine/`` (a free name: ``a.npz``, ``a-1.npz``, ...) and
    write the reason beside it. Returns the new path, or None when the move failed (logged)."""
    folder = inbox / QUARANTINE
    try:
        folder.mkdir(exist_ok=True)
        target = folder / path.name
        n = 0
        while target.exists():
            n += 1
            target = folder / f"{path.stem}-{n}{path.suffix}"
        os.replace(path, target)
        write_text_atomic(target.with_name(target.name + ".reason.txt"), reason + "\n")
    except OSError as err:
        log.error("%s is not valid data (%s) and could not be moved to %s: %s", path, reason, folder, err)
        return None
    log.warning("quarantined %s: %s (see %s)", path.name, reason, folder)
    return target


def parse_data_file(name: str, raw: bytes, input_shape: tuple[int, ...], num_classes: int) -> LabelledSplit:
    """Samples of one file's bytes: float32 x ``[N, *input_shape]``, int64 y ``[N]``.

    Raises BadFile with the reason when the file breaks the inbox convention."""
    if not raw:
        raise BadFile("the file is empty")
    x, y = _read_npz(raw) if name.lower().endswith(".npz") else _read_csv(raw)
    return validate_samples(x, y, input_shape, num_classes)


def _read_npz(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    # the bytes come from anywhere: whatever numpy or zipfile raises on them makes a bad file
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError:
        raise BadFile("not an .npz archive (a pickle or other format, which is never loaded)") from None
    except Exception as err:
        raise BadFile(f"cannot read the .npz archive: {err}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise BadFile("a single .npy array, not an .npz archive: save x and y with numpy.savez(path, x=x, y=y)")
    with loaded:
        if "x" not in loaded.files or "y" not in loaded.files:
            raise BadFile(f"needs arrays 'x' and 'y', found {sorted(loaded.files) or 'none'}")
        try:
            return loaded["x"], loaded["y"]
        except ValueError as err:
            if "allow_pickle" in str(err):
                raise BadFile("holds Python objects (pickled arrays), which are never loaded: save numeric arrays") from None
            raise BadFile(f"cannot read the .npz archive: {err}") from None
        except Exception as err:
            raise BadFile(f"cannot read the .npz archive: {err}") from None


def _read_csv(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadFile("not UTF-8 text, so not a CSV file") from None
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not rows:
        raise BadFile("the CSV file has no header row")
    header = [cell.strip() for cell in rows[0]]
    if header.count(LABEL_COLUMN) != 1:
        raise BadFile(f"the CSV header needs exactly one column named '{LABEL_COLUMN}', found {header}")
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise BadFile(f"CSV row {number} has {len(row)} fields, the header has {len(header)}")
    try:
        values = np.array(rows[1:], dtype=str).reshape(len(rows) - 1, len(header)).astype(np.float64)
    except ValueError as err:
        raise BadFile(f"CSV values must be numbers: {err}") from None
    label = header.index(LABEL_COLUMN)
    return np.delete(values, label, axis=1), values[:, label]


def validate_samples(x: np.ndarray, y: np.ndarray, input_shape: tuple[int, ...], num_classes: int) -> LabelledSplit:
    """Samples fit for training: ``x`` as float32 ``[N, *input_shape]`` (uint8 pixels scaled by
    1/255, flat rows reshaped), finite; ``y`` whole labels in ``0..num_classes-1``. BadFile says
    what is wrong otherwise."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise BadFile("holds no samples")
    n, shape = x.shape[0], tuple(input_shape)
    flat = int(np.prod(shape))
    one_channel = len(shape) == 3 and shape[0] == 1
    if x.shape[1:] == (flat,) or (one_channel and x.shape[1:] == shape[1:]):
        x = x.reshape(n, *shape)
    elif x.shape[1:] != shape:
        accepted = [f"[N, {', '.join(map(str, shape))}]", f"[N, {flat}]"] + ([f"[N, {shape[1]}, {shape[2]}]"] if one_channel else [])
        raise BadFile(f"x has shape {list(x.shape)}; expected {' or '.join(accepted)}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused below
            x = x.astype(np.float32)
    else:
        raise BadFile(f"x has dtype {x.dtype}: use uint8 pixels (scaled by 1/255) or floats (used as they are)")
    if not np.isfinite(x).all():
        raise BadFile("x holds NaN or infinite values (or floats too large for float32)")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != n:
        raise BadFile(f"y has shape {list(y.shape)}; expected [{n}], one label per sample of x")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise BadFile(f"y has dtype {y.dtype}: labels must be whole numbers")
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise BadFile("y holds labels that are not whole numbers")
    if y.min() < 0 or y.max() >= num_classes:
        raise BadFile(f"labels range from {y.min():g} to {y.max():g}; they must lie in 0..{num_classes - 1}")
    return LabelledSplit(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))
