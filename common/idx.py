"""Read IDX files (the MNIST format): a big-endian header, then raw data.

Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
uint32 per dimension. A file whose data is shorter or longer than its header promises
is refused: a truncated download must never become a silently smaller dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np

from common import idx_cache
from common.errors import FedtideError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx_bytes(path: Path) -> bytes:
    """The decompressed content of ``path`` (``.gz`` or raw)."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise FedtideError(
            f"{path} is damaged or truncated ({err}): delete it and download it again"
        ) from None


def parse_idx(content: bytes, source: str) -> np.ndarray:
    if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] not in _DTYPES:
        raise FedtideError(f"{source} is not an IDX file (bad header): check the file name and source")
    ndim = content[3]
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise FedtideError(f"{source} is truncated inside its header: download it again")
    dims = struct.unpack(f">{ndim}I", content[4:header_size])
    dtype = np.dtype(_DTYPES[content[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    actual = len(content) - header_size
    if actual != expected:
        raise FedtideError(
            f"{source} holds {actual} data bytes but its header promises {expected} "
            f"(shape {list(dims)}): the file is truncated or corrupted; download it again"
        )
    return np.frombuffer(content, dtype=dtype, offset=header_size).reshape(dims)


def read_idx(path: Path, sha256: str | None = None, cache: bool = True) -> np.ndarray:
    """Read one IDX file; with ``sha256``, check the decompressed content first. With
    ``cache``, a file verified before and unchanged since comes from ``common.idx_cache``
    (``fedtide download`` passes False: it must hash what it keeps or fetches)."""
    if cache and sha256 is not None and (cached := idx_cache.load_cached(path, sha256)) is not None:
        return cached
    content = read_idx_bytes(path)
    if sha256 is not None:
        digest = hashlib.sha256(content).hexdigest()
        if digest != sha256:
            raise FedtideError(
                f"{path} does not match its published checksum (sha256 {digest[:12]}..., "
                f"expected {sha256[:12]}...): the file is corrupted or not the original; "
                "delete it and download it again"
            )
        array = parse_idx(content, str(path))
        if cache:
            idx_cache.store(path, sha256, array)
        return array
    return parse_idx(content, str(path))
