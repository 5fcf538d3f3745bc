"""The global model as a training message carries it: its weights, or, with
``--compress-down``, one packed array (``PACKED_MODEL_NAME``: the model quantised per chunk,
``common.compression``) that the client unpacks against its own model's names and shapes.
The client's compressed update is then made against the unpacked model (``client.compressed_reply``)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.compression import CodecError, decode_update
from common.config import PACKED_MODEL_NAME, ClientSettings
from common.errors import FedtideError
from common.models import build_model


def received_model(arrays: ArrayRecord, config: ClientSettings, input_shape: tuple[int, ...],
                   num_classes: int) -> dict[str, torch.Tensor]:
    """The weights a training message's ``arrays`` record stands for; FedtideError when it is
    packed and cannot be unpacked for this model."""
    if PACKED_MODEL_NAME not in arrays:
        return arrays.to_torch_state_dict()
    codec = config.learner.compress_down
    if codec == "none" or len(arrays) != 1:
        raise FedtideError(f"the server sent a packed model, but this run's settings say --compress-down {codec} "
                           f"(and it holds {len(arrays)} array(s)): run client and server of the same fedtide")
    try:
        packed = arrays[PACKED_MODEL_NAME].numpy()
    except Exception:  # an Array whose bytes do not fit its own dtype and shape
        raise FedtideError("the server's packed model is not a readable array") from None
    model = build_model(config.network.model, input_shape, num_classes, config.network.hidden_widths, config.seed)
    reference = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise FedtideError(f"the server's packed model must be a 1-D uint8 array, not {packed.dtype}")
    try:
        weights = decode_update(packed.tobytes(), reference, codec)
    except CodecError as err:
        raise FedtideError(f"the server's packed model does not fit this client's model: {err}") from None
    return {name: torch.from_numpy(np.array(value)) for name, value in weights.items()}
