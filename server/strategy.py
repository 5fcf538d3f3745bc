"""Strategies on Flower's Message API, each with every reply validated before aggregation.

``ReplyValidation`` sits in front of any Flower strategy in the MRO: it keeps the global
model's array specs when a round is configured, drops invalid or failed replies (logged,
recorded in the run history), and hands only the valid ones to the wrapped strategy.
The wire keys stay Flower's (``arrays``, ``metrics``, ``num-examples``), so vanilla
Flower clients and strategies interoperate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from common.config import RunConfig
from server.history import RunHistory
from server.timing import PhaseTimes
from server.validation import METRICS_KEY, ArraySpec, array_specs, check_metrics, validate_reply

log = logging.getLogger("fedtide.server")


class ReplyValidation:
    """Mixin: validate replies, then delegate to the next strategy in the MRO."""

    def __init__(
        self,
        *args,
        history: RunHistory,
        max_num_examples: int,
        frozen: tuple[str, ...] = (),
        times: PhaseTimes | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.history = history
        self.times = times or PhaseTimes()
        self.max_num_examples = max_num_examples
        self.frozen = frozen
        self._current: ArrayRecord | None = None
        self._expected: dict[str, ArraySpec] = {}
        self.accepted_nodes: list[int] = []  # nodes whose replies the last round aggregated

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self._expected:  # the initial model fixes names, shapes and dtypes for the run
            self._expected = array_specs(arrays)
        self._current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        with self.times.phase("aggregate"):
            return self._validate_and_aggregate(server_round, replies)

    def _validate_and_aggregate(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid: list[Message] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = f"client failed: {reply.error.reason}"
            else:
                reason = validate_reply(reply.content, self._expected, self.max_num_examples)
            if reason is not None:
                log.warning("round %d: dropped reply from node %d: %s", server_round, node, reason)
                self.history.rejected_reply(server_round, node, reason)
                continue
            self.history.client_reply(node, dict(reply.content.metric_records[METRICS_KEY]))
            valid.append(reply)
        self.accepted_nodes = [reply.metadata.src_node_id for reply in valid]
        arrays, metrics = super().aggregate_train(server_round, valid)
        if metrics is not None:
            self.history.train_metrics(dict(metrics))
        if arrays is not None:
            arrays = self._as_global(arrays)
        return arrays, metrics

    def _as_global(self, arrays: ArrayRecord) -> ArrayRecord:
        """Server optimizers (FedAdam, FedAvgM) compute in float64: the model keeps its dtypes.
        Frozen layers keep their exact values (averaging equal arrays still rounds)."""
        is_frozen = {name: bool(self.frozen) and name.startswith(self.frozen) for name in self._expected}
        if not any(is_frozen.values()) and all(
            str(arrays[name].dtype) == spec.dtype for name, spec in self._expected.items()
        ):
            return arrays
        out = {}
        for name, spec in self._expected.items():
            if is_frozen[name] and self._current is not None:
                out[name] = self._current[name]
            else:
                out[name] = Array(arrays[name].numpy().astype(spec.dtype))
        return ArrayRecord(out)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Client-side evaluation replies carry only metrics; drop those that fail or lie."""
        valid = []
        for reply in replies:
            metrics = None if reply.has_error() else reply.content.metric_records.get(METRICS_KEY)
            if metrics is None or check_metrics(metrics, self.max_num_examples) is not None:
                continue
            valid.append(reply)
        metrics = super().aggregate_evaluate(server_round, valid)
        if metrics is not None:
            self.history.evaluate_metrics(dict(metrics))
        return metrics


class DriftResponse:
    """Mixin: the server's reaction to drift its clients report.

    A node that reported drift trains its next round with ``epoch_boost`` times the local
    epochs (it must learn a new task); after a round in which at least ``quorum`` of the
    replies reported drift, the next round samples every node.
    """

    def __init__(self, *args, drift_quorum: float, epoch_boost: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drift_quorum = drift_quorum
        self.epoch_boost = epoch_boost
        self._sample_all_next = False
        self._to_boost: set[int] = set()
        self.boosted_rounds: list[int] = []

    def configure_train(self, server_round, arrays, config, grid):
        fraction = self.fraction_train
        if self._sample_all_next:
            self.fraction_train = 1.0
        try:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        finally:
            self.fraction_train = fraction
        boosted_any = False
        for message in messages:
            if message.metadata.dst_node_id in self._to_boost:
                content = RecordDict(dict(message.content))
                boosted = ConfigRecord(dict(content[self.configrecord_key]))
                boosted["local-epochs"] = int(boosted["local-epochs"]) * self.epoch_boost
                content[self.configrecord_key] = boosted
                message.content = content
                self._to_boost.discard(message.metadata.dst_node_id)
                boosted_any = True
        if boosted_any or self._sample_all_next:
            self.boosted_rounds.append(server_round)
        return messages

    def aggregate_train(self, server_round, replies):
        result = super().aggregate_train(server_round, replies)
        self._to_boost |= set(self.history.pending_drifted_nodes())
        self._sample_all_next = self.history.pending_drift_fraction() >= self.drift_quorum
        return result


class LocalOnly(ReplyValidation, FedAvg):
    """Reference without federation: every client keeps training its own model.

    Each node is sent its own last model (the initial one at first); the "global" model
    reported is the mean, but evaluation averages the accuracy of the nodes' own models.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.node_arrays: dict[int, ArrayRecord] = {}

    def _construct_messages(self, record, node_ids, message_type):
        messages = []
        for node_id in node_ids:
            own = RecordDict(dict(record))
            if node_id in self.node_arrays:
                own[self.arrayrecord_key] = self.node_arrays[node_id]
            messages.append(Message(content=own, message_type=message_type, dst_node_id=node_id))
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        accepted = set(self.accepted_nodes)
        for reply in replies:
            if reply.metadata.src_node_id in accepted:
                self.node_arrays[reply.metadata.src_node_id] = reply.content[self.arrayrecord_key]
        return arrays, metrics

    def models_to_evaluate(self, arrays: ArrayRecord) -> list[ArrayRecord]:
        return list(self.node_arrays.values()) or [arrays]


class ValidatedFedAvg(ReplyValidation, FedAvg):
    pass


class ValidatedFedProx(ReplyValidation, FedProx):
    pass


class ValidatedFedAvgM(ReplyValidation, FedAvgM):
    pass


class ValidatedFedAdam(ReplyValidation, FedAdam):
    pass


def build_strategy(config: RunConfig, history: RunHistory, times: PhaseTimes | None = None) -> FedAvg:
    """The strategy a config names, sampling ``fraction_train`` of the nodes each round,
    with the server's drift response in front when ``react_server`` is on."""
    strategy_class, kwargs = _strategy_parts(config, history)
    kwargs["times"] = times
    if config.react_server:
        strategy_class = type(f"DriftResponsive{strategy_class.__name__}", (DriftResponse, strategy_class), {})
        kwargs.update(drift_quorum=config.drift_quorum, epoch_boost=config.drift_epoch_boost)
    return strategy_class(**kwargs)


def _strategy_parts(config: RunConfig, history: RunHistory) -> tuple[type, dict]:
    common = dict(
        history=history,
        max_num_examples=config.max_num_examples,
        frozen=config.frozen_prefixes,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if config.fraction_evaluate > 0 else 0,
        min_available_nodes=config.effective_min_clients,
    )
    if config.training == "local-only":
        return LocalOnly, common
    if config.strategy == "fedprox":
        return ValidatedFedProx, dict(proximal_mu=config.prox_mu, **common)
    if config.strategy == "fedavgm":
        return ValidatedFedAvgM, dict(
            server_learning_rate=config.effective_server_lr, server_momentum=config.server_momentum, **common
        )
    if config.strategy == "fedadam":
        return ValidatedFedAdam, dict(eta=config.effective_server_lr, **common)
    return ValidatedFedAvg, common
