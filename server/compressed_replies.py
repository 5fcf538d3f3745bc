"""Compressed replies on the server: unpack a client's packed update (``--compress``,
``common.compression``) into the weights it stands for, before validation sees the reply.

The update is decoded against the model the node was sent (the round's global model, its
cluster's, or the version an asynchronous node started from), so validation, the influence
bound and every aggregation rule work on the decoded weights as on a plain reply. A payload
that is not exactly what the model and codec make is refused with the reason; a plain reply
(a Flower client that does not compress) is taken as it is. With ``--compress-down`` the
training messages carry the model packed too (``DownlinkModel``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common.compression import CodecError, decode_update, encode_update
from common.config import PACKED_MODEL_NAME, PACKED_NAME

ARRAYS_KEY = "arrays"


def is_packed(content: RecordDict) -> bool:
    return ARRAYS_KEY in content.array_records and PACKED_NAME in content.array_records[ARRAYS_KEY]


def unpack_reply(content: RecordDict, reference: dict[str, np.ndarray], codec: str) -> tuple[RecordDict | None, str | None]:
    """(the reply with its weights decoded, None) or (None, the reason to drop it)."""
    if not is_packed(content):
        return content, None
    if codec == "none":
        return None, "the reply is a compressed update, but this run's clients send weights (--compress none)"
    arrays = content.array_records[ARRAYS_KEY]
    if len(arrays) != 1:
        return None, f"a compressed reply holds one array, {PACKED_NAME!r}; this one holds {len(arrays)}"
    try:
        packed = arrays[PACKED_NAME].numpy()
    except Exception:  # an Array whose bytes do not fit its own dtype and shape
        return None, "its packed update is not a readable array"
    if packed.dtype != np.uint8 or packed.ndim != 1:
        return None, f"its packed update must be a 1-D uint8 array, not {packed.dtype} {list(packed.shape)[:4]}"
    try:
        update = decode_update(packed.tobytes(), reference, codec)
    except CodecError as err:
        return None, f"its packed update is refused: {err}"
    weights = {}
    for name, base in reference.items():
        if np.issubdtype(base.dtype, np.floating):
            with np.errstate(over="ignore", invalid="ignore"):  # non-finite sums are validation's to refuse
                weights[name] = (base + update[name]).astype(base.dtype)
        else:
            weights[name] = update[name]
    decoded = RecordDict(dict(content))
    decoded[ARRAYS_KEY] = ArrayRecord({name: Array(np.ascontiguousarray(w)) for name, w in weights.items()})
    return decoded, None


class DownlinkModel:
    """``--compress-down``: the global model a training message carries, quantised per chunk
    (``common.compression``, against zero) and packed as one uint8 array, ``PACKED_MODEL_NAME``;
    packed once per model, whichever nodes it goes to. The server keeps the full model: a
    client's compressed update, made against the model it unpacked, is read against the full
    one, so the quantisation is not learned as if it were an update (error feedback)."""

    def __init__(self, codec: str) -> None:
        self.codec = codec
        self._last: tuple[ArrayRecord, ArrayRecord] | None = None

    def pack(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.codec == "none":
            return arrays
        if self._last is None or self._last[0] is not arrays:
            payload, _ = encode_update({name: array.numpy() for name, array in arrays.items()}, self.codec)
            self._last = (arrays, ArrayRecord({PACKED_MODEL_NAME: Array(np.frombuffer(payload, np.uint8).copy())}))
        return self._last[1]


def payload_size(content: RecordDict) -> int:
    """Bytes of the arrays a reply or message carries (what the wire carries, less framing)."""
    return sum(len(a.data) for record in content.array_records.values() for a in record.values())
