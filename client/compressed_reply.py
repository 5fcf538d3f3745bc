"""A client's reply as a compressed update (``--compress int8|int4``, ``common.compression``).

The reply's ``arrays`` record then holds one array, ``PACKED_NAME``: the packed update of the
weights against the global model the client received. What quantisation left out is the
client's residual, kept in its state beside the rest (``RESIDUAL_PREFIX`` + tensor name) and
added to its next update (error feedback), so it survives a restart like the replay memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from client.rounds import TrainOutcome
from common.compression import encode_update
from common.config import PACKED_NAME

RESIDUAL_PREFIX = "compress.residual."


def compress_outcome(codec: str, received: dict[str, torch.Tensor], outcome: TrainOutcome,
                     before: dict[str, torch.Tensor]) -> TrainOutcome:
    """``outcome`` with its weights replaced by the packed update against ``received`` (plus
    the residual in the state ``before`` the round) and its state holding the new residual;
    unchanged with codec ``none``."""
    if codec == "none":
        return outcome
    state = dict(outcome.state)
    update: dict[str, np.ndarray] = {}
    for name, weight in outcome.weights.items():
        value = weight.detach().cpu()
        if value.is_floating_point() and name in received and received[name].shape == value.shape:
            residual = before.get(RESIDUAL_PREFIX + name)
            delta = value.float() - received[name].detach().cpu().float()
            if residual is not None and residual.shape == delta.shape:
                delta = delta + residual
            update[name] = delta.numpy()
        else:  # integer buffers travel whole; a shape the server did not send is its to refuse
            update[name] = value.numpy()
    payload, sent = encode_update(update, codec)
    for name, delta in update.items():
        if np.issubdtype(delta.dtype, np.floating):
            state[RESIDUAL_PREFIX + name] = torch.from_numpy(delta - sent[name])
    packed = torch.from_numpy(np.frombuffer(payload, np.uint8).copy())
    return dataclasses.replace(outcome, weights={PACKED_NAME: packed}, state=state)
