"""Strategies on Flower's Message API, each with every reply validated before aggregation.

``ReplyValidation`` sits in front of any Flower strategy in the MRO: it keeps the global
model's array specs when a round is configured, drops invalid or failed replies (logged,
recorded in the run history), and hands only the valid ones to the wrapped strategy.
The wire keys stay Flower's (``arrays``, ``metrics``, ``num-examples``), so vanilla
Flower clients and strategies interoperate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from common.config import RunConfig
from server.grids import GridWrapper, wait_for_nodes
from server.history import RunHistory
from server.robust import AggregationRule
from server.timing import PhaseTimes
from server.validation import METRICS_KEY, ArraySpec, array_specs, check_metrics, validate_and_decode

log = logging.getLogger("fedtide.server")

# Decoded reply arrays kept from validation for aggregation, at most this many bytes per round:
# past it (many clients, large models) aggregation decodes the rest again rather than hold them.
DECODED_BUDGET = 256 * 2**20


class ReplyValidation:
    """Mixin: validate replies, then delegate to the next strategy in the MRO.

    Beyond the checks of ``validate_and_decode`` it counts each node's rejected replies and, after
    ``exclude_after`` of them (0: never), stops sampling that node. When the valid replies
    of a round cannot satisfy the aggregation ``rule`` (e.g. multikrum with too few), or the
    aggregate is not finite, the round keeps the previous global model and says why.
    """

    def __init__(
        self,
        *args,
        history: RunHistory,
        max_num_examples: int,
        frozen: tuple[str, ...] = (),
        times: PhaseTimes | None = None,
        max_update_norm: float = 0.0,
        max_reply_mb: float = 0.0,
        exclude_after: int = 0,
        rule: AggregationRule = AggregationRule(),
        client_wait: float = 600.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.client_wait = client_wait
        self.history = history
        self.times = times or PhaseTimes()
        self.max_num_examples = max_num_examples
        self.frozen = frozen
        self.max_update_norm = max_update_norm
        self.max_reply_bytes = int(max_reply_mb * 2**20)
        self.exclude_after = exclude_after
        self.rule = rule
        self._current: ArrayRecord | None = None
        self._reference: dict[str, np.ndarray] | None = None
        self._expected: dict[str, ArraySpec] = {}
        self.accepted_nodes: list[int] = []  # nodes whose replies the last round aggregated
        # id(reply content) -> (that content, its arrays as validation decoded them), during aggregation
        self.decoded_replies: dict[int, tuple[RecordDict, dict[str, np.ndarray]]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self._expected:  # the initial model fixes names, shapes and dtypes for the run
            self._expected = array_specs(arrays)
        self._current = arrays
        if self.max_update_norm > 0:
            self._reference = {name: array.numpy() for name, array in arrays.items()}
        with self._sampling(grid) as view:
            if view is None:
                log.error("round %d: every node is excluded; no client trains", server_round)
                return []
            # Flower sizes the sample from the nodes connected at the moment it looks: wait for
            # the minimum first, or a node that reconnects a second late misses the round
            wait_for_nodes(view, self.min_available_nodes, self.client_wait)
            return super().configure_train(server_round, arrays, config, view)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        with self._sampling(grid) as view:
            return [] if view is None else super().configure_evaluate(server_round, arrays, config, view)

    @contextmanager
    def _sampling(self, grid: Grid) -> Iterator[Grid | None]:
        """The grid as sampling should see it: without the excluded nodes (None when no node
        is left), with the wait for available nodes lowered to match."""
        excluded = self.excluded
        if not excluded:
            yield grid
            return
        view = _GridWithout(grid, excluded)
        if not view.get_node_ids():
            yield None
            return
        saved = self.min_available_nodes
        self.min_available_nodes = max(0, saved - len(excluded))
        try:
            yield view
        finally:
            self.min_available_nodes = saved

    @property
    def excluded(self) -> set[int]:
        """Nodes no longer sampled (kept in the history, so that a resumed run keeps them)."""
        return self.history.excluded_nodes

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        log.warning("round %d: dropped reply from node %d: %s", server_round, node, reason)
        self.history.rejected_reply(server_round, node, reason)
        count = self.history.reject_count(node)
        if self.exclude_after and count >= self.exclude_after and node not in self.excluded:
            log.warning("round %d: node %d excluded after %d rejected replies; it is no longer sampled",
                        server_round, node, count)
            self.history.node_excluded(server_round, node)

    def _keep_global(self, server_round: int, reason: str) -> tuple[None, None]:
        log.warning("round %d: %s; the global model stays as it was", server_round, reason)
        self.history.aggregation_skipped(server_round, self.rule.name, reason)
        return None, None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        with self.times.phase("aggregate"):
            try:
                return self._validate_and_aggregate(server_round, replies)
            finally:
                self.decoded_replies.clear()

    def _validate_and_aggregate(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid: list[Message] = []
        excluded = self.excluded
        kept = 0  # bytes of decoded arrays kept for aggregation
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in excluded:
                reason = "node is excluded after repeated rejected replies"
            elif reply.has_error():
                reason = f"client failed: {reply.error.reason}"
            else:
                reason, decoded = validate_and_decode(
                    reply.content, self._expected, self.max_num_examples, max_reply_bytes=self.max_reply_bytes,
                    max_update_norm=self.max_update_norm, reference=self._reference,
                )
            if reason is not None:
                self._reject(server_round, node, reason)
                continue
            self.history.client_reply(node, dict(reply.content.metric_records[METRICS_KEY]))
            if decoded is not None and kept + (size := sum(a.nbytes for a in decoded.values())) <= DECODED_BUDGET:
                self.decoded_replies[id(reply.content)] = (reply.content, decoded)
                kept += size
            valid.append(reply)
        self.accepted_nodes = [reply.metadata.src_node_id for reply in valid]
        if (reason := self.rule.precondition(len(valid))) is not None:
            return self._keep_global(server_round, reason)
        arrays, metrics = super().aggregate_train(server_round, valid)
        if metrics is not None:
            self.history.train_metrics(dict(metrics))
        if arrays is not None:
            arrays = self._as_global(arrays)
            if not all(np.isfinite(array.numpy()).all() for array in arrays.values()):
                return self._keep_global(server_round, "the aggregate holds NaN or Inf")
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


class _GridWithout(GridWrapper):
    """A view of a grid that hides some nodes from sampling; everything else passes through."""

    def __init__(self, grid: Grid, hidden: set[int]) -> None:
        super().__init__(grid)
        self._hidden = hidden

    def get_node_ids(self) -> list[int]:
        return [node for node in self.inner.get_node_ids() if node not in self._hidden]


class RobustAggregation(FedAvg):
    """FedAvg with the array aggregation of ``self.rule`` (``server.robust``).

    It goes last among a strategy's bases, so that it takes FedAvg's place in the MRO:
    FedAvgM, FedAdam and FedProx then apply their server step to the robust aggregate.
    Metrics are still Flower's weighted mean. Rule ``fedavg`` is FedAvg's weighted mean
    (summed in float64). Arrays that validation decoded already (``decoded_replies``) are
    not decoded again.
    """

    rule: AggregationRule = AggregationRule()

    def configure_train(self, server_round, arrays, config, grid):
        self._rule_reference = arrays  # the global model this round's updates start from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [message.content for message in valid]
        reference = {name: array.numpy() for name, array in self._rule_reference.items()}

        def arrays_of(content) -> dict[str, np.ndarray]:
            known = getattr(self, "decoded_replies", {}).get(id(content))
            if known is not None and known[0] is content:
                return known[1]
            return {name: a.numpy() for name, a in content[self.arrayrecord_key].items()}

        aggregated = self.rule.aggregate([arrays_of(c) for c in contents], self.aggregation_weights(contents), reference)
        arrays = ArrayRecord({name: Array(value) for name, value in aggregated.items()})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def aggregation_weights(self, contents: list[RecordDict]) -> list[float]:
        """Each reply's weight in the aggregate: its ``num-examples``."""
        return [float(c.metric_records[METRICS_KEY][self.weighted_by_key]) for c in contents]


class DriftWeighting:
    """Mixin: the server's same-round reaction to drift. A reply that reports drift weighs
    ``drift_weight`` times its ``num-examples`` in this round's aggregate, so that what the
    drifting clients just learned is not averaged away by those still on the old data."""

    def __init__(self, *args, drift_weight: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drift_weight = drift_weight

    def aggregation_weights(self, contents: list[RecordDict]) -> list[float]:
        weights = super().aggregation_weights(contents)
        return [
            w * self.drift_weight if c.metric_records[METRICS_KEY].get("drift-detected", 0) == 1 else w
            for w, c in zip(weights, contents)
        ]


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


class ValidatedFedAvg(ReplyValidation, RobustAggregation):
    pass


class ValidatedFedProx(ReplyValidation, FedProx, RobustAggregation):
    pass


class ValidatedFedAvgM(ReplyValidation, FedAvgM, RobustAggregation):
    pass


class ValidatedFedAdam(ReplyValidation, FedAdam, RobustAggregation):
    pass


def build_strategy(config: RunConfig, history: RunHistory, times: PhaseTimes | None = None) -> FedAvg:
    """The strategy a config names, sampling ``fraction_train`` of the nodes each round,
    with the server's drift reactions in front: ``DriftWeighting`` when ``drift_weight`` is
    not 1, ``DriftResponse`` when ``react_server`` is on."""
    strategy_class, kwargs = _strategy_parts(config, history)
    kwargs["times"] = times
    if config.drift_weight != 1.0 and config.training != "local-only":
        strategy_class = type(f"DriftWeighted{strategy_class.__name__}", (DriftWeighting, strategy_class), {})
        kwargs["drift_weight"] = config.drift_weight
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
        max_update_norm=config.max_update_norm,
        max_reply_mb=config.max_reply_mb,
        exclude_after=config.exclude_after,
        client_wait=config.client_wait,
    )
    if config.training == "local-only":
        return LocalOnly, common  # each node keeps its own model: nothing to aggregate robustly
    common["rule"] = AggregationRule.from_config(config)
    if config.strategy == "fedprox":
        return ValidatedFedProx, dict(proximal_mu=config.prox_mu, **common)
    if config.strategy == "fedavgm":
        return ValidatedFedAvgM, dict(
            server_learning_rate=config.effective_server_lr, server_momentum=config.server_momentum, **common
        )
    if config.strategy == "fedadam":
        return ValidatedFedAdam, dict(eta=config.effective_server_lr, **common)
    return ValidatedFedAvg, common
