"""``FedtideStrategy``: one Flower Message API strategy, composed of parts.

- a ``ReplyValidator`` (``server.validation``): every reply is checked before it can reach
  aggregation; an invalid or failed one is dropped with its reason, logged and recorded;
- an ``InfluenceBound`` (``server.influence``): no reply's claimed weight or update norm
  counts more than a multiple of the round's median;
- an ``AggregationRule`` (``server.robust``): the weighted mean, or a robust rule;
- a ``ServerStep`` (``server.server_step``): FedAvg, FedAvgM or FedAdam's server optimizer;
- ``RoundHook``s (``server.round_hooks``): drift weighting, drift response, local-only models;
  later behaviours join the same list;
- ``Receipts`` (``server.receipts``): each training message tells its node the run's identity
  and the last round whose global model holds that node's reply;
- a ``DriftCredit`` (``server.drift_credit``): which drift reports the reactions may act on.

Each part owns its state (``state()`` / ``load_state()``), so a checkpoint never reads a
private or a Flower-internal attribute. The wire keys stay Flower's (``arrays``,
``config``, ``metrics``, ``num-examples``), so plain Flower clients and servers interoperate;
replies that carry no fedtide metrics are aggregated like any other.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.config import RunConfig, check_server
from common.sections import DriftSettings, ServerSettings
from server.drift_credit import DriftCredit
from server.history import RunHistory
from server.influence import InfluenceBound
from server.robust import AggregationRule, update_norm
from server.sampling import NodeSampling
from server.receipts import Receipts
from server.round_hooks import ARRAYS_KEY, CONFIG_KEY, DriftResponse, DriftWeighting, LocalModels, RoundHook
from server.server_step import ServerStep, server_step
from server.timing import PhaseTimes
from server.reply_metrics import WEIGHT_KEY, MetricSpec, ReplyMetrics, describe_dropped
from server.validation import METRICS_KEY, ReplyValidator, Verdict, client_error

log = logging.getLogger("fedtide.server")

# Decoded reply arrays kept from validation for aggregation, at most this many bytes per round:
# past it (many clients, large models) aggregation decodes the rest again rather than hold them.
DECODED_BUDGET = 256 * 2**20


class FedtideStrategy(Strategy):
    """Validated, robust, composable FedAvg-family strategy (see the module docstring)."""

    def __init__(
        self,
        *,
        history: RunHistory,
        validator: ReplyValidator,
        sampling: NodeSampling,
        rule: AggregationRule = AggregationRule(),
        influence: InfluenceBound = InfluenceBound(),
        step: ServerStep | None = None,
        hooks: Sequence[RoundHook] = (),
        exclude_after: int = 0,
        frozen: tuple[str, ...] = (),
        extra_config: dict[str, Any] | None = None,
        times: PhaseTimes | None = None,
        drift_credit: DriftCredit | None = None,
    ) -> None:
        self.history = history
        self.drift_credit = drift_credit or DriftCredit(0.0)
        self.validator = validator
        self.sampling = sampling
        self.rule = rule
        self.influence = influence
        self.step = step or ServerStep()
        self.hooks = list(hooks)
        self.exclude_after = exclude_after
        self.frozen = frozen
        self.extra_config = dict(extra_config or {})  # e.g. FedProx's `proximal-mu`, for plain Flower clients
        self.times = times or PhaseTimes()
        self.accepted_nodes: list[int] = []  # nodes whose replies the last round aggregated
        self.receipts = Receipts()
        self._sent: list[Message] = []  # this round's training messages (Flower gives them ids when it sends them)
        self._current: ArrayRecord | None = None
        self._reference: dict[str, np.ndarray] = {}

    # ---- Flower's Strategy --------------------------------------------------
    def summary(self) -> None:
        log.info("FedtideStrategy: rule %s, step %s, hooks %s", self.rule.name, self.step.name,
                 [type(h).__name__ for h in self.hooks])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.validator.start_round(arrays)
        self._current = arrays
        self._reference = {name: array.numpy() for name, array in arrays.items()}
        self.step.start_round(server_round, self._reference)
        everyone = any(hook.sample_everyone(server_round) for hook in self.hooks)
        nodes = self.sampling.sample(grid, 1.0 if everyone else self.sampling.fraction_train, self.excluded)
        if nodes is None:
            log.error("round %d: every node is excluded; no client trains", server_round)
            return []
        messages = self._messages(server_round, arrays, config, nodes, MessageType.TRAIN)
        for hook in self.hooks:
            messages = hook.configure(server_round, messages)
        self._sent = self.receipts.stamp(messages)
        return self._sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.sampling.fraction_evaluate == 0:
            return []
        nodes = self.sampling.sample(grid, self.sampling.fraction_evaluate, self.excluded)
        if nodes is None:
            return []
        messages = self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE)
        for hook in self.hooks:
            messages = hook.configure_evaluate(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        with self.times.phase("aggregate"):
            valid, decoded, norms = self._accept(server_round, replies)
            try:
                aggregated, metrics = self._aggregate(server_round, valid, decoded, norms)
                if aggregated is not None:
                    self.receipts.aggregated(server_round, self.accepted_nodes)
                return aggregated, metrics
            finally:
                for hook in self.hooks:
                    hook.after_aggregate(server_round, valid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Client-side evaluation replies carry only metrics; drop those that fail or lie."""
        checked = [None if r.has_error() else self.validator.check_evaluation(r.content) for r in replies]
        kept = [metrics for metrics in checked if metrics is not None]
        weights, _ = self.influence.cap_weights([float(m[WEIGHT_KEY]) for m in kept])  # no liar skews the mean
        valid = [RecordDict({METRICS_KEY: MetricRecord({**m, WEIGHT_KEY: w})}) for m, w in zip(kept, weights)]
        metrics = weighted_metrics(valid) if valid else None
        if metrics is not None:
            self.history.evaluate_metrics(dict(metrics))
        return metrics

    # ---- what the run folder, checkpoints and evaluation read ---------------
    @property
    def excluded(self) -> set[int]:
        """Nodes no longer sampled (kept in the history, so that a resumed run keeps them)."""
        return self.history.excluded_nodes

    def models_to_evaluate(self, arrays: ArrayRecord) -> list[ArrayRecord]:
        for hook in self.hooks:
            models = hook.models_to_evaluate(arrays)
            if models is not None:
                return models
        return [arrays]

    def state(self) -> dict[str, Any]:
        """Every part's state between rounds, merged (keys are unique across parts)."""
        out: dict[str, Any] = {}
        for part in [self.step, self.receipts, self.drift_credit, *self.hooks]:
            part_state = part.state()
            clash = set(part_state) & set(out)
            assert not clash, f"strategy parts share state keys {clash}"
            out.update(part_state)
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        for part in [self.step, self.receipts, self.drift_credit, *self.hooks]:
            part.load_state(state)

    def run_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = self.drift_credit.summary()
        for hook in self.hooks:
            out.update(hook.summary())
        return out

    # ---- the round's steps --------------------------------------------------
    def _messages(self, server_round, arrays, config, nodes, message_type) -> list[Message]:
        config.update(self.extra_config)
        config["server-round"] = server_round
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})  # one payload, shared
        return [Message(content=content, message_type=message_type, dst_node_id=node) for node in nodes]

    def _accept(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[Message], list[dict | None], list[float] | None]:
        """The replies that pass validation and the influence bound's outlier check, their
        decoded arrays (None past the budget) and their update norms (None when the bound
        reads none). An accepted reply's metrics are replaced by what the schema keeps of
        them, so that the hooks, the history and the summary read only checked values."""
        candidates: list[tuple[Message, Verdict, float]] = []
        excluded = self.excluded
        kept = 0  # bytes of decoded arrays kept for aggregation
        for reply in replies:
            node = self._sender(reply)
            if node in excluded:
                verdict = Verdict("node is excluded after repeated rejected replies")
            elif reply.has_error():
                verdict = Verdict(f"client failed: {client_error(reply.error.code, reply.error.reason)}")
            else:
                verdict = self.validator.check(reply.content)
            if verdict.reason is not None:
                self._reject(server_round, node, verdict.reason)
                continue
            norm = update_norm(verdict.arrays, self._reference) if self.influence.reads_norms else 0.0
            size = sum(a.nbytes for a in verdict.arrays.values())
            if kept + size <= DECODED_BUDGET:
                kept += size
            else:
                verdict = dataclasses.replace(verdict, arrays=None)
            candidates.append((reply, verdict, norm))
        outliers = self.influence.outliers([norm for _, _, norm in candidates])
        valid, decoded_arrays, norms = [], [], []
        for index, (reply, verdict, norm) in enumerate(candidates):
            node = self._sender(reply)
            if index in outliers:
                self._reject(server_round, node, outliers[index])
                continue
            if verdict.dropped:
                log.warning("round %d: node %s: %s", server_round, self.history.label(node),
                            describe_dropped(verdict.dropped))
            metrics = self.drift_credit.judge(server_round, node, verdict.metrics, self.history.label(node))
            reply.content[METRICS_KEY] = MetricRecord(metrics)
            self.history.client_reply(node, metrics)
            valid.append(reply)
            decoded_arrays.append(verdict.arrays)
            norms.append(norm)
        self.accepted_nodes = [reply.metadata.src_node_id for reply in valid]
        return valid, decoded_arrays, norms if self.influence.reads_norms else None

    def _sender(self, reply: Message) -> int:
        """The node a reply is about. Flower's SuperLink answers for a node it lost (missed
        heartbeats) with an error reply of its own: that one is the node's whose message it
        replies to."""
        if reply.has_error() and (replied_to := reply.metadata.reply_to_message_id):
            for message in self._sent:
                if message.metadata.message_id == replied_to:
                    return message.metadata.dst_node_id
        return reply.metadata.src_node_id

    def _aggregate(
        self, server_round: int, valid: list[Message], decoded: list[dict | None], norms: list[float] | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if (reason := self.rule.precondition(len(valid))) is not None:
            return self._keep_global(server_round, reason)
        contents = [reply.content for reply in valid]
        arrays = [
            known if known is not None else {name: a.numpy() for name, a in c[ARRAYS_KEY].items()}
            for known, c in zip(decoded, contents)
        ]
        claims = [float(c.metric_records[METRICS_KEY][WEIGHT_KEY]) for c in contents]
        weights, capped = self.influence.cap_weights(claims)  # before the hooks: they weigh on purpose
        for hook in self.hooks:
            weights = hook.weights(contents, weights)
        if self.rule.weighs_replies:
            self.history.aggregation_weights(weights)
        arrays, cut = self.influence.cap_updates(arrays, self._reference, norms)
        if capped or cut:
            self.history.influence_capped(capped, cut)
        aggregate = self.rule.aggregate(arrays, weights, self._reference)
        before = self.step.state()  # a step's state moves on only with a model that is kept
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is caught below
            new_model = self._as_global(self.step.apply(server_round, aggregate))
        metrics = weighted_metrics(contents)
        self.history.train_metrics(dict(metrics))
        if not all(np.isfinite(array.numpy()).all() for array in new_model.values()):
            self.step.load_state(before)
            return self._keep_global(server_round, "the aggregate holds NaN or Inf")
        return new_model, metrics

    def _as_global(self, arrays: dict[str, np.ndarray]) -> ArrayRecord:
        """Server optimizers compute in float64: the model keeps its dtypes. Frozen layers keep
        their exact values (averaging equal arrays still rounds)."""
        out = {}
        for name, spec in self.validator.expected.items():
            if self.frozen and name.startswith(self.frozen) and self._current is not None:
                out[name] = self._current[name]
            else:
                out[name] = Array(np.asarray(arrays[name]).astype(spec.dtype, copy=False))
        return ArrayRecord(out)

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        log.warning("round %d: dropped reply from node %s: %s", server_round, self.history.label(node), reason)
        self.history.rejected_reply(server_round, node, reason)
        count = self.history.reject_count(node)
        if self.exclude_after and count >= self.exclude_after and node not in self.excluded:
            log.warning("round %d: node %s excluded after %d rejected replies; it is no longer sampled",
                        server_round, self.history.label(node), count)
            self.history.node_excluded(server_round, node)

    def _keep_global(self, server_round: int, reason: str) -> tuple[None, None]:
        log.warning("round %d: %s; the global model stays as it was", server_round, reason)
        self.history.aggregation_skipped(server_round, self.rule.name, reason)
        return None, None


def weighted_metrics(contents: list[RecordDict]) -> MetricRecord:
    """Each metric's mean over the replies that carry it, weighted by their ``num-examples``
    (which itself is left out). A plain Flower client's reply, with fewer metrics than
    fedtide's, simply does not count in the means it has no value for; a metric whose kind
    (a number, or a list of one length) differs between replies is left out, not a crash."""
    records = [c.metric_records[METRICS_KEY] for c in contents]
    kinds: dict[str, set] = {}
    totals: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if key != WEIGHT_KEY:
                kinds.setdefault(key, set()).add(len(value) if isinstance(value, list) else None)
                totals[key] = totals.get(key, 0.0) + float(record[WEIGHT_KEY])
    sums: dict[str, Any] = {}
    for record in records:
        weight = float(record[WEIGHT_KEY])
        for key, value in record.items():
            if key == WEIGHT_KEY or len(kinds[key]) > 1:
                continue
            factor = weight / totals[key]
            if isinstance(value, list):
                term = [v * factor for v in value]
                sums[key] = term if key not in sums else [s + t for s, t in zip(sums[key], term)]
            else:
                sums[key] = value * factor if key not in sums else sums[key] + value * factor
    return MetricRecord(sums)


def build_strategy(
    server: ServerSettings | None = None,
    drift: DriftSettings | None = None,
    *,
    min_nodes: int,
    history: RunHistory | None = None,
    local_only: bool = False,
    frozen: tuple[str, ...] = (),
    proximal_mu: float = 0.0,
    num_tasks: int | None = None,
    reply_metrics: dict[str, MetricSpec] | None = None,
    times: PhaseTimes | None = None,
) -> FedtideStrategy:
    """fedtide's strategy from its settings, for ``run_federation`` or your own ServerApp.

    ``server``: sampling, server step, reply limits and aggregation rule; ``drift``: the
    server's drift reactions; ``min_nodes``: connected nodes a round waits for;
    ``local_only``: the no-federation reference (each node keeps its own model);
    ``frozen``: parameter-name prefixes that keep their values; ``proximal_mu``: FedProx's
    term, sent to clients as ``proximal-mu`` with ``--strategy fedprox``; ``num_tasks``: the
    run's tasks, which bound a reply's ``task-id``; ``reply_metrics``: your clients' own
    metrics to keep, e.g. ``{"accuracy": MetricSpec("float", 0, 1)}`` (unknown metrics are
    dropped, see ``server.reply_metrics``)."""
    server = server or ServerSettings()
    drift = drift or DriftSettings()
    history = history or RunHistory()
    replies = min_nodes if drift.react_server else max(int(min_nodes * server.fraction_train), 1)
    check_server(server, drift, replies, local_only, proximal_mu)
    hooks: list[RoundHook] = []
    if local_only:
        hooks.append(LocalModels())
    elif drift.drift_weight != 1.0:
        hooks.append(DriftWeighting(drift.drift_weight))
    if drift.react_server:
        hooks.append(DriftResponse(drift.drift_quorum, drift.drift_epoch_boost))
    return FedtideStrategy(
        history=history,
        validator=ReplyValidator(server.max_num_examples, server.max_update_norm, server.max_reply_mb,
                                 ReplyMetrics(server.max_num_examples, num_tasks, reply_metrics)),
        sampling=NodeSampling(server.fraction_train, server.fraction_evaluate, min_nodes, server.client_wait),
        rule=AggregationRule() if local_only else AggregationRule.from_settings(server),
        influence=InfluenceBound(0, 0, 0) if local_only else _influence(server, drift),
        step=ServerStep() if local_only else server_step(server.strategy, server.effective_server_lr,
                                                         server.server_momentum),
        hooks=hooks,
        exclude_after=server.exclude_after,
        frozen=frozen,
        extra_config={"proximal-mu": proximal_mu} if server.strategy == "fedprox" and not local_only else None,
        times=times,
        drift_credit=DriftCredit(drift.drift_evidence, drift.drift_follow_rounds),
    )


def _influence(server: ServerSettings, drift: DriftSettings) -> InfluenceBound:
    """The run's influence bound. A drift reaction that trains a drifting client harder makes
    its honest update an outlier by design: then the caps stay and the outlier rule is off."""
    outlier = server.norm_outlier
    if outlier and drift.enlarges_updates:
        log.info("drift reactions enlarge honest updates: --norm-outlier is off for this run (the caps stay)")
        outlier = 0.0
    return InfluenceBound(server.weight_cap, server.norm_cap, outlier)


def run_strategy(config: RunConfig, history: RunHistory, times: PhaseTimes | None = None) -> FedtideStrategy:
    """The strategy of a fedtide run."""
    return build_strategy(
        config.server, config.drift, min_nodes=config.effective_min_clients, history=history,
        local_only=config.data.training == "local-only", frozen=config.network.frozen_prefixes,
        proximal_mu=config.methods.options["prox-mu"], num_tasks=history.num_tasks, times=times,
    )
