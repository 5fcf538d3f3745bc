"""One inbox file's bytes to samples, within limits, trusting nothing in them.

Whoever writes into the inbox may be hostile (see SECURITY.md), so reading a file:

- is bounded before anything is inflated or parsed: ``MAX_FILE_BYTES`` for the file;
  ``MAX_VALUES`` (x and y together) and ``MAX_UNPACKED_BYTES`` for an ``.npz`` archive's
  arrays, checked in its zip directory, again in each array's header, and enforced while
  inflating (only as many bytes as the header promises are ever inflated: the directory and
  headers can lie); ``MAX_CSV_FIELD_CHARS`` for a CSV field and, from it, the longest line;
- reads ``.npz`` archives member by member with ``zipfile`` and ``numpy.lib.format``: stored
  or deflated members (what ``numpy.savez`` and ``savez_compressed`` write) of plain numeric
  dtypes; an object array (a pickle) is refused from its header, before a byte of it is read;
- refuses values outside a declared range (``DEFAULT_FEATURE_RANGE`` unless the deployment
  sets ``--feature-range``), so finite but absurd values (1e30) never reach training;
- says why in ``BadFile``'s message without quoting the file: no header cells, array names,
  values or parser messages, only counts, shapes, plain dtypes and positions.
"""

from __future__ import annotations

import io
import math
import zipfile
from typing import Iterator

import numpy as np
import torch

from client.feature_range import DEFAULT_FEATURE_RANGE
from common.datasets import LabelledSplit

# A file is a delivery of new samples, not a dataset: 64 MiB holds 85,000 28x28 uint8 images.
MAX_FILE_BYTES = 64 * 2**20
# Values of x and y together in one file: 16.7 M, 64 MiB as the float32 the model trains on
# (21,000 28x28 images); with float64 arrays, the widest accepted dtype, 128 MiB unpacked.
MAX_VALUES = 2**24
MAX_UNPACKED_BYTES = 8 * MAX_VALUES
MAX_MEMBERS = 16  # numpy.savez writes one zip member per array: x, y and a few more at most
NPY_HEADER_BYTES = 2**16  # room for an .npy header beside its data
# The longest float numpy or Python writes is 24 characters ('-2.2250738585072014e-308').
MAX_CSV_FIELD_CHARS = 64
LABEL_COLUMN = "label"
PYTHON_OBJECTS = "holds Python objects (pickled arrays), which are never loaded: save numeric arrays"


class BadFile(Exception):
    """A data file that breaks the inbox convention; the message is the reason (never quotes
    the file's content)."""


def parse_data_file(
    name: str, raw: bytes, input_shape: tuple[int, ...], num_classes: int,
    feature_range: tuple[float, float] = DEFAULT_FEATURE_RANGE,
) -> LabelledSplit:
    """Samples of one file's bytes: float32 x ``[N, *input_shape]``, int64 y ``[N]``.

    Raises BadFile with the reason when the file breaks the inbox convention."""
    x, y = _read_file(name, raw, input_shape, labels_needed=True)
    return validate_samples(x, y, input_shape, num_classes, feature_range)


def parse_inputs(
    name: str, raw: bytes, input_shape: tuple[int, ...], num_classes: int,
    feature_range: tuple[float, float] = DEFAULT_FEATURE_RANGE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples to predict: x as ``parse_data_file`` reads it, and the labels when the file
    has them (``y`` / a ``label`` column), else None. Raises BadFile with the reason."""
    x, y = _read_file(name, raw, input_shape, labels_needed=False)
    if y is None:
        return torch.from_numpy(np.ascontiguousarray(_checked_inputs(x, input_shape, feature_range))), None
    samples = validate_samples(x, y, input_shape, num_classes, feature_range)
    return samples.x, samples.y


def _read_file(name: str, raw: bytes, input_shape: tuple[int, ...],
               labels_needed: bool) -> tuple[np.ndarray, np.ndarray | None]:
    if not raw:
        raise BadFile("the file is empty")
    if len(raw) > MAX_FILE_BYTES:
        raise BadFile(f"larger than {MAX_FILE_BYTES // 2**20} MiB: split it into several files")
    if name.lower().endswith(".npz"):
        return _read_npz(raw, labels_needed)
    return _read_csv(raw, math.prod(input_shape), labels_needed)


def _read_npz(raw: bytes, labels_needed: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    if raw.startswith(b"\x93NUMPY"):
        raise BadFile("a single .npy array, not an .npz archive: save x and y with numpy.savez(path, x=x, y=y)")
    # every zip entry needs this signature in the central directory: a cheap upper bound on
    # how many entries zipfile would parse (each costs memory) before it parses any
    if raw.count(b"PK\x01\x02") > MAX_MEMBERS:
        raise BadFile(f"an archive of more than {MAX_MEMBERS} entries: an .npz file holds arrays x and y")
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise BadFile("not an .npz archive (a zip of .npy arrays; pickles are never loaded), or a truncated one") from None
    with archive:
        names = {info.filename for info in archive.infolist()}
        if "x.npy" not in names or (labels_needed and "y.npy" not in names):
            needed = "'x' and 'y' (numpy.savez(path, x=x, y=y))" if labels_needed else "'x' (numpy.savez(path, x=x))"
            raise BadFile(f"needs arrays {needed}; it holds {len(names)} entries")
        infos = [archive.getinfo(n) for n in ("x.npy", "y.npy") if n in names]
        if sum(info.file_size for info in infos) > MAX_UNPACKED_BYTES + 2 * NPY_HEADER_BYTES:
            raise BadFile(f"x and y unpack to more than {MAX_UNPACKED_BYTES // 2**20} MiB: split it into several files")
        x = _read_member(archive, infos[0], MAX_VALUES)
        return x, (_read_member(archive, infos[1], MAX_VALUES - x.size) if len(infos) > 1 else None)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_values: int) -> np.ndarray:
    """One array of the archive, inflating no more than its checked header promises."""
    what = info.filename[0]  # 'x' or 'y'
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise BadFile(f"{what} is compressed with a method numpy.savez never uses: save with numpy.savez")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise BadFile(f"{what} is an .npy array of a version fedtide does not read: save with numpy.savez")
        if dtype.hasobject:
            raise BadFile(PYTHON_OBJECTS)
        if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "iuf" or dtype.itemsize > 8:
            shown = dtype.name if dtype.fields is None and dtype.subdtype is None else "a structured dtype"
            raise BadFile(f"{what} has dtype {shown}: save plain integer or float arrays")
        if any(d < 0 for d in shape) or math.prod(shape) > max_values:
            raise BadFile(f"x and y hold more than {MAX_VALUES:,} values: split it into several files")
        data = _inflate(member, math.prod(shape) * dtype.itemsize, what)
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def _inflate(member: io.BufferedIOBase, size: int, what: str) -> bytearray:
    """Exactly ``size`` bytes of ``member``, read in slices; BadFile when it has fewer or more."""
    data, got = bytearray(size), 0
    while got < size:
        chunk = member.read(min(2**20, size - got))
        if not chunk:
            raise BadFile(f"{what} is cut short (a half-written file?)")
        data[got:got + len(chunk)] = chunk
        got += len(chunk)
    if member.read(1):  # also makes zipfile check the member's CRC
        raise BadFile(f"{what} holds more bytes than its array header says")
    return data


def _read_csv(raw: bytes, width: int, labels_needed: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Features and labels of a CSV file whose header names ``width`` features and one
    ``label`` column (which may be missing when not ``labels_needed``: labels are then None).
    Fields are never quoted (numbers need no quotes); a header name may be.
    Read line by line from the bytes: memory stays near the size of the numbers."""
    columns = width + 1
    rows = _rows(raw, columns * (MAX_CSV_FIELD_CHARS + 1) + 2)
    _, header = next(rows, (0, []))
    try:
        header = [cell.decode("utf-8-sig" if i == 0 else "utf-8").strip().strip('"') for i, cell in enumerate(header)]
    except UnicodeDecodeError:
        raise BadFile("the CSV header is not UTF-8 text") from None
    if not header:
        raise BadFile("the CSV file has no header row")
    if not labels_needed and LABEL_COLUMN not in header and len(header) == width:
        columns = width  # inputs alone, to predict
    elif header.count(LABEL_COLUMN) != 1:
        raise BadFile(f"the CSV header needs exactly one column named '{LABEL_COLUMN}' ({header.count(LABEL_COLUMN)} found)")
    if len(header) != columns:
        raise BadFile(f"the CSV header has {len(header)} columns; expected {width} features and '{LABEL_COLUMN}'")
    label = header.index(LABEL_COLUMN) if columns > width else None
    features, labels, block, count = [], [], [], 0
    for number, row in rows:
        if len(row) != columns:
            raise BadFile(f"CSV line {number} has {len(row)} fields, the header has {columns}")
        count += 1
        if count * columns > MAX_VALUES:
            raise BadFile(f"the CSV file holds more than {MAX_VALUES:,} values: split it into several files")
        try:
            block.append([float(cell) for cell in row])
        except ValueError:
            raise BadFile(f"CSV line {number} holds a field that is not a number") from None
        if len(block) == 1024:
            _add_block(block, label, features, labels)
    _add_block(block, label, features, labels)
    if not features:
        return np.zeros((0, width), np.float32), (np.zeros(0) if label is not None else None)
    return np.concatenate(features), (np.concatenate(labels) if label is not None else None)


def _rows(raw: bytes, longest: int) -> Iterator[tuple[int, list[bytes]]]:
    """The non-blank lines of ``raw`` (numbered from 1) split at commas; each line is checked
    against ``longest`` before it is cut out, each field against MAX_CSV_FIELD_CHARS."""
    start, number = 0, 0
    while start < len(raw):
        number += 1
        end = raw.find(b"\n", start, start + longest + 1)
        if end < 0:
            if len(raw) - start > longest:
                raise BadFile(f"CSV line {number} is longer than {longest:,} characters: not a line of numbers")
            end = len(raw)
        row = raw[start:end].rstrip(b"\r").split(b",")
        start = end + 1
        if any(len(cell) > MAX_CSV_FIELD_CHARS for cell in row):
            raise BadFile(f"CSV line {number} has a field longer than {MAX_CSV_FIELD_CHARS} characters: not a number")
        if any(cell.strip() for cell in row):
            yield number, row


def _add_block(block: list[list[float]], label: int | None, features: list, labels: list) -> None:
    """Move the parsed rows of ``block`` into float32 feature and float64 label arrays
    (``label``: the label's column, None when there is none)."""
    if not block:
        return
    values = np.array(block, dtype=np.float64)
    block.clear()
    if label is not None:
        labels.append(values[:, label].copy())
        values = np.delete(values, label, axis=1)
    with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused as not finite
        features.append(values.astype(np.float32))


def validate_samples(
    x: np.ndarray, y: np.ndarray, input_shape: tuple[int, ...], num_classes: int,
    feature_range: tuple[float, float] = DEFAULT_FEATURE_RANGE,
) -> LabelledSplit:
    """Samples fit for training: ``x`` as float32 ``[N, *input_shape]`` (uint8 pixels scaled by
    1/255, flat rows reshaped), finite and within ``feature_range``; ``y`` whole labels in
    ``0..num_classes-1``. BadFile says what is wrong otherwise."""
    x = _checked_inputs(x, input_shape, feature_range)
    n = x.shape[0]
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != n:
        raise BadFile(f"y has shape {list(y.shape)}; expected [{n}], one label per sample of x")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise BadFile(f"y has dtype {y.dtype.name}: labels must be whole numbers")
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise BadFile("y holds labels that are not whole numbers")
    outside = int(np.count_nonzero((y < 0) | (y >= num_classes)))
    if outside:
        raise BadFile(f"{outside:,} label(s) outside 0..{num_classes - 1}")
    return LabelledSplit(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))


def _checked_inputs(x: np.ndarray, input_shape: tuple[int, ...], feature_range: tuple[float, float]) -> np.ndarray:
    """``x`` as float32 ``[N, *input_shape]`` (see ``validate_samples``); BadFile otherwise."""
    if x.ndim == 0 or x.shape[0] == 0:
        raise BadFile("holds no samples")
    n, shape = x.shape[0], tuple(input_shape)
    flat = math.prod(shape)
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
        raise BadFile(f"x has dtype {x.dtype.name}: use uint8 pixels (scaled by 1/255) or floats (used as they are)")
    if not np.isfinite(x).all():
        raise BadFile("x holds NaN or infinite values (or floats too large for float32)")
    low, high = feature_range
    if x.min() < low or x.max() > high:
        outside = int(np.count_nonzero((x < low) | (x > high)))
        raise BadFile(f"x holds {outside:,} value(s) outside [{low:g}, {high:g}]: scale the features "
                      "(or start the client with another --feature-range)")
    return x
