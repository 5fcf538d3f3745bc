"""Round hooks: server behaviours that join a round at fixed points, composed in a list.

``FedtideStrategy`` calls every hook of its list at each point, in order:
- ``sample_everyone(round)``: whether this round's training asks every node;
- ``configure(round, messages)``: change the training messages about to be sent
  (``configure_evaluate``: the evaluation messages);
- ``weights(contents, weights)``: change the aggregation weights of the accepted replies;
- ``after_aggregate(round, accepted)``: see the accepted replies once the round is aggregated;
- ``models_to_evaluate(arrays)``: the models whose accuracies the round reports (first hook
  that answers wins);
- ``served_models(arrays, nodes)``: the models nodes are served when it is not the global one;
- ``state()`` / ``load_state()``: what it carries between rounds, for checkpoints;
- ``summary()``: figures for the run's summary.

A new server behaviour is one hook class here and its test.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from common.config import EPOCH_BOOST_KEY
from server.drift_credit import CREDIT_KEY, REPORT_KEY
from server.validation import METRICS_KEY

ARRAYS_KEY, CONFIG_KEY = "arrays", "config"


class RoundHook:
    """Does nothing at every point; a hook overrides the points it joins."""

    def sample_everyone(self, server_round: int) -> bool:
        return False

    def configure(self, server_round: int, messages: list[Message]) -> list[Message]:
        return messages

    def configure_evaluate(self, server_round: int, messages: list[Message]) -> list[Message]:
        return messages

    def weights(self, contents: list[RecordDict], weights: list[float]) -> list[float]:
        return weights

    def after_aggregate(self, server_round: int, accepted: list[Message]) -> None:
        pass

    def models_to_evaluate(self, arrays: ArrayRecord) -> list[ArrayRecord] | None:
        return None

    def served_models(self, arrays: ArrayRecord, nodes: list[int]) -> dict[int, ArrayRecord]:
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}


def _reaction_due(content: RecordDict) -> bool:
    """Whether the same-round reactions act on this reply: a credited drift report, or a
    round that follows one (``server.drift_credit``)."""
    return content.metric_records[METRICS_KEY].get(CREDIT_KEY, 0) == 1


def credited_report(content: RecordDict) -> bool:
    """Whether the reply reports drift and the server credited the report."""
    metrics = content.metric_records[METRICS_KEY]
    return metrics.get(CREDIT_KEY, 0) == 1 and metrics.get(REPORT_KEY, 0) == 1


class DriftWeighting(RoundHook):
    """The server's same-round reaction to drift: a reply that reports drift weighs ``factor``
    times its ``num-examples`` in this round's aggregate, so that what the drifting clients
    just learned is not averaged away by those still on the old data."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def weights(self, contents, weights):
        return [w * self.factor if _reaction_due(c) else w for w, c in zip(weights, contents)]


class DriftResponse(RoundHook):
    """The server's reaction to drift its clients report, in the next round.

    A node that reported drift trains its next round with ``epoch_boost`` times the local
    epochs (it must learn a new task); after a round in which at least ``quorum`` of the
    accepted replies reported drift, the next round samples every node.
    """

    def __init__(self, quorum: float, epoch_boost: int) -> None:
        self.quorum = quorum
        self.epoch_boost = epoch_boost
        self.sample_all_next = False
        self.to_boost: set[int] = set()
        self.boosted_rounds: list[int] = []

    def sample_everyone(self, server_round):
        return self.sample_all_next

    def configure(self, server_round, messages):
        boosted_any = False
        for message in messages:
            if message.metadata.dst_node_id in self.to_boost:
                content = RecordDict(dict(message.content))
                boosted = ConfigRecord(dict(content[CONFIG_KEY]))
                boosted[EPOCH_BOOST_KEY] = self.epoch_boost  # a round's instruction: the settings stay as they are
                content[CONFIG_KEY] = boosted
                message.content = content
                self.to_boost.discard(message.metadata.dst_node_id)
                boosted_any = True
        if boosted_any or self.sample_all_next:
            self.boosted_rounds.append(server_round)
        return messages

    def after_aggregate(self, server_round, accepted):
        drifted = [reply.metadata.src_node_id for reply in accepted if credited_report(reply.content)]
        self.to_boost |= set(drifted)
        self.sample_all_next = bool(accepted) and len(drifted) / len(accepted) >= self.quorum

    def state(self):
        return {"drift_response": {
            "sample_all_next": self.sample_all_next, "to_boost": sorted(self.to_boost),
            "boosted_rounds": list(self.boosted_rounds),
        }}

    def load_state(self, state):
        if "drift_response" in state:
            saved = state["drift_response"]
            self.sample_all_next = bool(saved["sample_all_next"])
            self.to_boost = set(saved["to_boost"])
            self.boosted_rounds = list(saved["boosted_rounds"])

    def summary(self):
        return {"boosted_rounds": list(self.boosted_rounds)}


class LocalModels(RoundHook):
    """Reference without federation: every node keeps training its own model.

    Each node is sent its own last model (the initial one at first); the global model is
    still the aggregate, but a round reports the mean accuracy of the nodes' own models.
    """

    def __init__(self) -> None:
        self.node_arrays: dict[int, ArrayRecord] = {}

    def configure(self, server_round, messages):
        for message in messages:
            own = self.node_arrays.get(message.metadata.dst_node_id)
            if own is not None:
                content = RecordDict(dict(message.content))
                content[ARRAYS_KEY] = own
                message.content = content
        return messages

    configure_evaluate = configure  # a node evaluates its own model too

    def after_aggregate(self, server_round, accepted):
        for reply in accepted:
            self.node_arrays[reply.metadata.src_node_id] = reply.content[ARRAYS_KEY]

    def models_to_evaluate(self, arrays):
        return list(self.node_arrays.values()) or [arrays]

    def served_models(self, arrays, nodes):
        return {node: self.node_arrays[node] for node in nodes if node in self.node_arrays}

    def state(self):
        out: dict[str, Any] = {"node_arrays": list(self.node_arrays)}  # in order: evaluation averages over them
        for node, record in self.node_arrays.items():
            out[f"node_arrays/{node}"] = {name: a.numpy() for name, a in record.items()}
        return out

    def load_state(self, state):
        if "node_arrays" in state:
            self.node_arrays = {
                int(node): ArrayRecord({name: Array(a) for name, a in state[f"node_arrays/{node}"].items()})
                for node in state["node_arrays"]
            }


class PersonalHead(RoundHook):
    """Reference: personalised layers (FedPer's local head). The layers under ``prefixes``
    (the classifier head) stay each node's own: a node is sent the global model with its own
    last head, and is served that model; the rest is averaged as usual. The server keeps the
    heads here, so a node needs no state of its own (a deployment would keep them on the device)."""

    def __init__(self, prefixes: tuple[str, ...] = ("head.",)) -> None:
        self.prefixes = prefixes
        self.heads: dict[int, dict[str, Array]] = {}

    def _with_head(self, arrays: ArrayRecord, node: int) -> ArrayRecord:
        head = self.heads.get(node)
        if head is None:
            return arrays
        return ArrayRecord({name: head.get(name, array) for name, array in arrays.items()})

    def configure(self, server_round, messages):
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.heads:
                content = RecordDict(dict(message.content))
                content[ARRAYS_KEY] = self._with_head(content[ARRAYS_KEY], node)
                message.content = content
        return messages

    configure_evaluate = configure

    def after_aggregate(self, server_round, accepted):
        for reply in accepted:
            arrays = reply.content[ARRAYS_KEY]
            self.heads[reply.metadata.src_node_id] = {
                name: arrays[name] for name in arrays.keys() if name.startswith(self.prefixes)
            }

    def served_models(self, arrays, nodes):
        return {node: self._with_head(arrays, node) for node in nodes}

    def state(self):
        out: dict[str, Any] = {"personal_heads": sorted(self.heads)}
        for node, head in self.heads.items():
            out[f"personal_heads/{node}"] = {name: a.numpy() for name, a in head.items()}
        return out

    def load_state(self, state):
        if "personal_heads" in state:
            self.heads = {
                int(node): {name: Array(a) for name, a in state[f"personal_heads/{node}"].items()}
                for node in state["personal_heads"]
            }
