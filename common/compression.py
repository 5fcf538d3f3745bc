"""Compressed updates: what a client sends instead of its full weights (``--compress``).

A client sends its **update** (its weights minus the global model it received), quantised
per chunk of ``CHUNK`` values: each chunk gets one float32 scale (its largest magnitude over
``QMAX``) and each value a signed code (``int8``: -127..127, one byte; ``int4``: -7..7, two per
byte). The bytes are then packed losslessly with zstandard. What quantisation loses is kept by
the client (**error feedback**: ``residual``) and added to its next update, so nothing is lost
for good, only late.

The payload names nothing: both sides know the model (names in sorted order, shapes, dtypes),
so the decoder knows exactly how many bytes each tensor takes and refuses anything else. A
non-float tensor (an integer buffer) is sent whole, its raw little-endian values. Decoding
never inflates more than the model's size: a zstd bomb is refused, not unpacked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

CODECS = ("none", "int8", "int4")
CHUNK = 256
QMAX = {"int8": 127, "int4": 7}
ZSTD_LEVEL = 3


class CodecError(ValueError):
    """A payload that is not what the model and codec say it must be; the message says why."""


def _chunks(size: int) -> int:
    return max(1, math.ceil(size / CHUNK))


def _code_bytes(size: int, codec: str) -> int:
    padded = _chunks(size) * CHUNK
    return padded if codec == "int8" else padded // 2


def tensor_bytes(shape: tuple[int, ...], dtype: np.dtype, codec: str) -> int:
    """Bytes one tensor takes in the payload, before zstandard."""
    size = int(np.prod(shape, dtype=np.int64))
    if not np.issubdtype(dtype, np.floating):
        return size * np.dtype(dtype).itemsize
    return 4 * _chunks(size) + _code_bytes(size, codec)


def payload_bytes(model: Mapping[str, np.ndarray], codec: str) -> int:
    """The unpacked payload's size for ``model`` (names, shapes and dtypes are what count)."""
    return sum(tensor_bytes(a.shape, a.dtype, codec) for a in model.values())


def encode_update(update: Mapping[str, np.ndarray], codec: str) -> tuple[bytes, dict[str, np.ndarray]]:
    """(the packed payload, what it carries decoded) for ``update`` (float tensors: the update
    plus any residual; other tensors: the values to send). The caller keeps ``update - decoded``
    as its next residual."""
    import zstandard

    if codec not in QMAX:
        raise ValueError(f"unknown codec {codec!r}")
    parts: list[bytes] = []
    decoded: dict[str, np.ndarray] = {}
    for name in sorted(update):
        values = np.asarray(update[name])
        if not np.issubdtype(values.dtype, np.floating):
            parts.append(np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<")).tobytes())
            decoded[name] = values.copy()
            continue
        flat = values.astype(np.float32).ravel()
        padded = np.zeros(_chunks(flat.size) * CHUNK, np.float32)
        padded[: flat.size] = flat
        blocks = padded.reshape(-1, CHUNK)
        qmax = QMAX[codec]
        with np.errstate(invalid="ignore", over="ignore"):
            scales = (np.abs(blocks).max(axis=1) / qmax).astype(np.float32)
            safe = np.where(scales > 0, scales, 1.0)[:, None]
            codes = np.clip(np.rint(blocks / safe), -qmax, qmax)
        codes = np.nan_to_num(codes).astype(np.int8)  # a NaN scale already marks the chunk: it decodes to NaN
        parts.append(scales.astype("<f4").tobytes())
        if codec == "int8":
            parts.append(codes.tobytes())
        else:
            nibbles = (codes.ravel() + 8).astype(np.uint8)
            parts.append((nibbles[0::2] | (nibbles[1::2] << 4)).tobytes())
        decoded[name] = (codes.astype(np.float32) * scales[:, None]).ravel()[: flat.size].reshape(values.shape).astype(
            values.dtype)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(b"".join(parts)), decoded


def decode_update(payload: bytes, model: Mapping[str, np.ndarray], codec: str) -> dict[str, np.ndarray]:
    """The update a payload carries, for a model shaped like ``model``; CodecError when the
    payload is not exactly what that model and codec make (never inflating beyond that)."""
    import zstandard

    expected = payload_bytes(model, codec)
    if len(payload) > expected + 1024:  # zstandard never grows data by more than a few bytes per block
        raise CodecError(f"it holds {len(payload):,} bytes, more than the {expected:,} of the model's update unpacked")
    try:  # the frame's declared size is read first: a bomb is refused before a byte is unpacked
        declared = zstandard.frame_content_size(payload)
        if declared != expected:
            raise CodecError(f"it declares {declared:,} bytes unpacked (-1: none); the model's update takes {expected:,}")
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
    except zstandard.ZstdError as err:
        raise CodecError(f"it is not a zstandard frame of the update's size ({str(err)[:60]})") from None
    if len(raw) != expected:
        raise CodecError(f"it unpacks to {len(raw):,} bytes; the model's update takes {expected:,}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name in sorted(model):
        reference = np.asarray(model[name])
        size = reference.size
        if not np.issubdtype(reference.dtype, np.floating):
            width = size * reference.dtype.itemsize
            out[name] = np.frombuffer(raw, reference.dtype.newbyteorder("<"), size, offset).reshape(reference.shape)
            offset += width
            continue
        chunks = _chunks(size)
        scales = np.frombuffer(raw, "<f4", chunks, offset).astype(np.float32)
        offset += 4 * chunks
        width = _code_bytes(size, codec)
        codes = np.frombuffer(raw, np.int8 if codec == "int8" else np.uint8, width, offset)
        offset += width
        if codec == "int4":
            packed = codes
            codes = np.empty(2 * packed.size, np.int8)
            codes[0::2] = (packed & 0x0F).astype(np.int8) - 8
            codes[1::2] = (packed >> 4).astype(np.int8) - 8
            if np.any(codes < -QMAX["int4"]):
                raise CodecError("it holds an int4 code outside -7..7")
        elif np.any(codes < -QMAX["int8"]):
            raise CodecError("it holds an int8 code outside -127..127")
        values = (codes.reshape(chunks, CHUNK).astype(np.float32) * scales[:, None]).ravel()[:size]
        out[name] = values.reshape(reference.shape).astype(reference.dtype)
    return out
