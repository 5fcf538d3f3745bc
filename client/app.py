"""The Flower ClientApp: Message in, plain objects to ``client.rounds``, Message out.

The client's settings (``common.config.ClientSettings``: scenario, model, learner, methods,
drift) arrive with every message from the server (its ``config`` record) beside their digest;
a client parses and checks them once while they stay the same. Besides those it needs only
its node_config:
- simulated client: its ``partition-id`` of the scenario's data (and optionally ``device``);
  its continual-learning state lives in ``context.state``;
- edge client (``fedtide client``): ``inbox``, the folder where its data files arrive, and
  ``state-dir``, where its state lives on disk (``client.edge``), so that it survives a
  restart of the SuperNode; optionally ``feature-range`` (``LOW,HIGH``: what float values
  its data files may hold) and ``new-run`` (what its state of another run becomes:
  ``client.state_store``). A training message's receipt (``common.receipt``) says which
  of its rounds the server kept.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.clusters import check_choice, choose_model
from client.compressed_reply import compress_outcome
from client.packed_model import received_model
from client.rounds import TrainOutcome, evaluate_round, train_round
from client.secure_aggregation import is_secure, secure_aggregation_mod, secure_reply
from client.vectorized import train_rounds_together
from common.config import (
    CANDIDATE_PREFIX, CHOICE_RULE_KEY, EPOCH_BOOST_KEY, INPUT_SHAPE_KEY, NUM_CLASSES_KEY, PACKED_MODEL_NAME,
    RELEASE_INFO_KEY, RELEASED_KEY, SECURE_CLIP_KEY, SECURE_UNIT_WEIGHT_KEY, ClientSettings,
)
from common.datasets import LabelledSplit
from common.errors import FedtideError
from common.receipt import RECEIPT_KEY, Receipt
from common.sections import DriftSettings

STATE_KEY = "fedtide-state"
_PARSED: dict[str, ClientSettings] = {}  # the settings as sent -> parsed (a few at most)
ROUND_KEYS = ("server-round", EPOCH_BOOST_KEY, SECURE_CLIP_KEY, SECURE_UNIT_WEIGHT_KEY)  # a round's own instructions
_EPOCH_BOOST = dataclasses.replace(DriftSettings.declarations()["drift-epoch-boost"], name=EPOCH_BOOST_KEY, default=1)
app = ClientApp()


class Tampering(Protocol):
    """What a simulated faulty client changes (``client.faults``): its data before training,
    its reply after."""

    def poison(self, settings: ClientSettings, partition_id: int,
               server_round: int) -> Callable[[LabelledSplit], LabelledSplit] | None: ...

    def reply(self, settings: ClientSettings, partition_id: int, server_round: int,
              received: dict, outcome: TrainOutcome) -> TrainOutcome: ...


def received_settings(msg: Message) -> tuple[ClientSettings, int]:
    """The client settings the server sent, and the round; parsed and checked once as long
    as they stay the same. A drift response's ``epoch-boost`` multiplies this round's local
    epochs."""
    record = msg.content["config"]
    server_round = int(record.get("server-round", 0))
    # keyed by what was sent, not by the digest the server claims: a record that changed is parsed again
    key = repr(sorted((k, v) for k, v in record.items() if k not in ROUND_KEYS))
    settings = _PARSED.get(key)
    if settings is None:
        settings = ClientSettings.from_mapping(dict(record))
        if len(_PARSED) >= 4:
            _PARSED.clear()
        _PARSED[key] = settings
    boost = record.get(EPOCH_BOOST_KEY, 1)
    if boost != 1:
        epochs = settings.learner.local_epochs * _EPOCH_BOOST.parse(boost)
        settings = dataclasses.replace(settings, learner=dataclasses.replace(settings.learner, local_epochs=epochs))
    return settings, server_round


def _local(settings: ClientSettings, context: Context) -> ClientSettings:
    """A node may hold its data elsewhere than the server said (node_config ``data-dir``)."""
    data_dir = context.node_config.get("data-dir")
    if not data_dir:
        return settings
    return dataclasses.replace(settings, data=dataclasses.replace(settings.data, data_dir=str(data_dir)))


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _state(context: Context) -> dict:
    return context.state[STATE_KEY].to_torch_state_dict() if STATE_KEY in context.state else {}


def _reply(msg: Message, context: Context, outcome: TrainOutcome, received: dict | None = None) -> Message:
    """The reply to a training message; in a secure round, the update for SecAgg+ to mask
    (``received``: the model it was trained from)."""
    context.state[STATE_KEY] = ArrayRecord(outcome.state)
    if is_secure(msg):
        return secure_reply(msg, context, received if received is not None else msg.content["arrays"],
                            outcome.weights, outcome.metrics)
    content = RecordDict({"arrays": ArrayRecord(outcome.weights), "metrics": MetricRecord(outcome.metrics)})
    return Message(content=content, reply_to=msg)


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    return train_message(msg, context)


def train_message(msg: Message, context: Context, tampering: Tampering | None = None) -> Message:
    """One node's training round: an edge client's on its inbox, a simulated one's on its
    partition (changed by ``tampering`` when it simulates a faulty client)."""
    settings, server_round = received_settings(msg)
    if "inbox" in context.node_config:
        return _train_edge(msg, context, settings, server_round)
    settings = _local(settings, context)
    partition, received = _partition(context), _received(msg.content["arrays"], settings)
    before = _state(context)
    choice = None
    candidates = _candidates(msg.content)
    if candidates:
        choice = choose_model(settings, partition, server_round, candidates, _state(context),
                              str(msg.content["config"].get(CHOICE_RULE_KEY, "loss")), context.node_config.get("device"))
        received = candidates[choice.cluster]
    outcome = train_round(
        settings,
        partition,
        server_round,
        received,
        before,
        device_name=context.node_config.get("device"),
        poison=tampering.poison(settings, partition, server_round) if tampering else None,
    )
    if choice is not None:
        outcome = dataclasses.replace(outcome, metrics={**outcome.metrics, **choice.metrics()})
    if tampering is not None:
        outcome = tampering.reply(settings, partition, server_round, received, outcome)
    return _reply(msg, context, compress_outcome(settings.learner.compress, received, outcome, before), received)


def _received(arrays: ArrayRecord, settings: ClientSettings) -> dict:
    """A simulated client's received weights (unpacked with ``--compress-down``)."""
    if PACKED_MODEL_NAME not in arrays:
        return arrays.to_torch_state_dict()
    from common.scenarios import build_scenario

    scenario = build_scenario(settings.data, settings.seed)
    return received_model(arrays, settings, scenario.input_shape, scenario.num_classes)


def _candidates(content: RecordDict) -> dict[int, dict]:
    """The models the server offers to choose from (clustered training): ``model-<id>``
    array records. Empty when it sends one model."""
    out = {}
    for key in content.array_records:
        if key.startswith(CANDIDATE_PREFIX):
            try:
                cluster = int(key[len(CANDIDATE_PREFIX):])
            except ValueError:
                raise FedtideError(f"the server sent a model named {key[:40]!r}: run server and clients of the "
                                   "same fedtide version") from None
            out[cluster] = content[key].to_torch_state_dict()
    return out


def _train_edge(msg: Message, context: Context, config: ClientSettings, server_round: int) -> Message:
    from client.edge import train_on_arrivals
    from client.feature_range import parse_feature_range

    record = msg.content["config"]
    state_dir = context.node_config.get("state-dir")
    if not state_dir:
        raise FedtideError("this node has an inbox but no state-dir: start it with `fedtide client --state DIR`")
    if INPUT_SHAPE_KEY not in record or NUM_CLASSES_KEY not in record:
        raise FedtideError("the server sent no model shape: run the server with `fedtide server` of the same version")
    input_shape = tuple(int(d) for d in str(record[INPUT_SHAPE_KEY]).split(","))
    num_classes = int(record[NUM_CLASSES_KEY])
    candidates = _candidates(msg.content)
    if candidates:
        rule = str(record.get(CHOICE_RULE_KEY, "loss"))
        check_choice(rule, candidates)
        if rule != "loss":
            raise FedtideError(f"an edge client chooses its model by loss; '{rule[:20]}' needs a simulation")
    received = received_model(msg.content["arrays"], config, input_shape, num_classes)
    outcome = train_on_arrivals(
        config,
        input_shape,
        num_classes,
        server_round,
        received,
        Path(str(context.node_config["inbox"])),
        Path(str(state_dir)),
        device_name=context.node_config.get("device"),
        node_id=context.node_id,
        **({"feature_range": parse_feature_range(str(context.node_config["feature-range"]))}
           if "feature-range" in context.node_config else {}),
        receipt=Receipt.from_record(msg.content[RECEIPT_KEY]) if RECEIPT_KEY in msg.content else None,
        new_run=str(context.node_config.get("new-run", "fresh")),
        candidates=candidates,
        offer=_offer(msg.content),
    )
    _report_edge_round(server_round, outcome.metrics, str(context.node_config.get("name", "")))
    if is_secure(msg):
        return secure_reply(msg, context, received, outcome.weights, outcome.metrics)
    content = RecordDict({"arrays": ArrayRecord(outcome.weights), "metrics": MetricRecord(outcome.metrics)})
    return Message(content=content, reply_to=msg)  # the state is on disk, not in context.state


def _offer(content: RecordDict):
    """The released model the server serves with this message (``server.release_delivery``),
    unchecked; None when it sends none."""
    from client.released_model import Offer

    if RELEASE_INFO_KEY not in content.config_records:
        return None
    info = content[RELEASE_INFO_KEY]
    weights = None
    if RELEASED_KEY in content.array_records:
        try:
            weights = content[RELEASED_KEY].to_torch_state_dict()
        except Exception as err:  # arrays torch cannot take: the model held stays
            print(f"fedtide client: released model not kept: its arrays cannot be read ({str(err)[:80]})",
                  file=sys.stderr)
    return Offer(info.get("version"), info.get("sha256"), weights)


def _report_edge_round(server_round: int, metrics: dict, name: str = "") -> None:
    """One line for the device's log: what this round learned from (``name``: the node's)."""
    quarantined = f", {metrics['quarantined']} file(s) quarantined" if metrics["quarantined"] else ""
    drift = ", drift detected" if metrics["drift-detected"] else ""
    print(
        f"fedtide client{' ' + name if name else ''}: round {server_round}: {metrics['new-files']} new file(s), "
        f"{metrics['new-examples']} new samples, trained on {metrics['num-examples']}, prequential accuracy {100 * metrics['prequential-acc']:.1f}%"
        f"{quarantined}{drift}",
        file=sys.stderr, flush=True,
    )


_fallback_logged: list[bool] = []  # said once per process, not every round


def train_many(
    messages: list[Message], contexts: list[Context], tampering: Tampering | None = None
) -> list[Message] | None:
    """Several nodes' train messages in one vectorised computation, for a runtime that holds
    many nodes in one process. The replies and states are what ``train`` would give each
    node (up to float rounding). None when the messages cannot share one computation: then
    the runtime calls the ClientApp for each."""
    if len(messages) < 2 or any(m.metadata.message_type != MessageType.TRAIN or is_secure(m) for m in messages):
        return None
    first = messages[0].content
    if any(m.content["arrays"] is not first["arrays"] or m.content["config"] is not first["config"] for m in messages):
        return None  # not one broadcast: different models or settings
    if any(key.startswith(CANDIDATE_PREFIX) for key in first.array_records):
        return None  # each node chooses its own model
    if any(c.node_config.get(k) for c in contexts for k in ("device", "data-dir", "inbox")):
        return None
    try:
        config, server_round = received_settings(messages[0])
        if tampering is not None and any(tampering.poison(config, _partition(c), server_round) for c in contexts):
            return None  # a poisoned client trains on other data: one by one
        received = _received(first["arrays"], config)
        jobs = [(_partition(c), server_round, _state(c)) for c in contexts]
        outcomes = train_rounds_together(config, jobs, received)
    except Exception as err:  # the per-node path reports the error as each node's reply
        if not _fallback_logged:
            _fallback_logged.append(True)
            logging.getLogger("fedtide").info(
                "a round's clients train one by one: the batched path failed (%s: %s)", type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "")
        return None
    if outcomes is None:
        return None
    if tampering is not None:
        outcomes = [tampering.reply(config, job[0], server_round, received, o) for job, o in zip(jobs, outcomes)]
    outcomes = [compress_outcome(config.learner.compress, received, o, job[2]) for job, o in zip(jobs, outcomes)]
    return [_reply(m, c, o) for m, c, o in zip(messages, contexts, outcomes)]


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, server_round = received_settings(msg)
    config = _local(config, context)
    metrics = evaluate_round(
        config,
        _partition(context),
        server_round,
        msg.content["arrays"].to_torch_state_dict(),
        device_name=context.node_config.get("device"),
    )
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
