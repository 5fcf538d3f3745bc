"""A client's part in secure aggregation (SecAgg+, ``--secure-aggregation``).

A secure round reaches the ClientApp as four training messages, each with Flower's SecAgg+
record (``secaggplus_configs``): key setup, key shares, the masked update, unmasking.
``secure_aggregation_mod`` hands those to Flower's ``secaggplus_mod``, which holds the
protocol's keys in ``context.state`` for the round, and every other message straight to the
handler. Only the third stage trains: the handler trains as in any round, and
``secure_reply`` answers in the layout the mod reads (Flower's legacy ``FitRes``), with the
**update** (the trained weights minus the model received) instead of the weights. The mod
scales it by the client's weight, quantises it, masks it and sends only the masked vector;
the arrays of the handler's reply never leave the device.

The bounds the server can no longer check on a masked vector are applied here, before
masking: the update must be finite, and it is clipped to the round's ``secure-clip`` L2 norm
(``--max-update-norm``, or ``--dp-clip`` under client-level DP); the weight is capped by
the protocol's ``max_weight``, and is 1 for every client under client-level DP. Metrics
travel in the clear beside the masked vector, as in any round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from common.config import DP_SPENT_KEY, SECURE_CLIP_KEY, SECURE_UNIT_WEIGHT_KEY
from common.errors import FedtideError
from common.secure_aggregation import SECURE_CONFIGS, SECURE_STATE, as_numpy, float_names

WEIGHT_KEY = "num-examples"


def is_secure(msg: Message) -> bool:
    """Whether ``msg`` is a stage of a SecAgg+ round."""
    return SECURE_CONFIGS in msg.content.config_records


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ mod for the messages of a secure round; every other message goes
    straight to the handler (Flower's mod would refuse them)."""
    if not is_secure(msg):
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod  # the protocol's cryptography loads only when used

    return secaggplus_mod(msg, context, call_next)


def round_bounds(config: Mapping[str, Any]) -> tuple[float, bool]:
    """The secure round's clip norm (0: none) and whether every update counts alike, as the
    server's training message says; a bad value is an error, not a silent default."""
    clip = config.get(SECURE_CLIP_KEY, 0.0)
    unit = config.get(SECURE_UNIT_WEIGHT_KEY, False)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0:
        raise FedtideError(f"the server sent {SECURE_CLIP_KEY}={clip!r}; it must be a finite number >= 0: run the "
                           "server with `fedtide server` of the same version")
    if not isinstance(unit, bool):
        raise FedtideError(f"the server sent {SECURE_UNIT_WEIGHT_KEY}={unit!r}; it must be true or false")
    return float(clip), unit


def secure_reply(msg: Message, context: Context, received: Mapping[str, Any], weights: Mapping[str, Any],
                 metrics: Mapping[str, Any]) -> Message:
    """The reply ``secaggplus_mod`` masks: this client's update (``weights`` minus
    ``received``, clipped) and its weight, in Flower's legacy ``FitRes`` layout."""
    clip, unit_weight = round_bounds(msg.content["config"])
    names = float_names(msg.content["arrays"])
    update = [as_numpy(weights[name]).astype(np.float64) - as_numpy(received[name]).astype(np.float64) for name in names]
    norm = math.sqrt(sum(float(np.sum(u * u)) for u in update))
    if not math.isfinite(norm):
        raise FedtideError("this round's update holds NaN or Inf (the training diverged): lower --lr")
    if clip > 0 and norm > clip:
        update = [u * (clip / norm) for u in update]
    max_weight = float(context.state.config_records[SECURE_STATE]["max_weight"])
    weight = 1 if unit_weight else min(int(metrics.get(WEIGHT_KEY, 0)), int(max_weight))
    if metrics.get(DP_SPENT_KEY):  # it did not train: nothing to add, and no weight to dilute the others
        update, weight = [np.zeros_like(u) for u in update], 0
    content = RecordDict({
        "fitres.parameters": ArrayRecord(update),
        "fitres.num_examples": MetricRecord({"num_examples": weight}),
        "fitres.metrics": ConfigRecord(dict(metrics)),
        "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
    })
    return Message(content=content, reply_to=msg)

