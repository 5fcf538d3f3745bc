"""``FedtideStrategy``: one Flower Message API strategy, composed of parts.

- a ``ReplyValidator`` (``server.validation``): every reply is checked before it can reach
  aggregation; an invalid or failed one is dropped with its reason, logged and recorded;
- an ``InfluenceBound`` (``server.influence``): no reply's claimed weight or update norm
  counts more than a multiple of the round's median;
- an ``AggregationRule`` (``server.robust``): the weighted mean, or a robust rule;
- a ``ServerStep`` (``server.server_step``): FedAvg, FedAvgM or FedAdam's server optimizer;
- ``RoundHook``s (``server.round_hooks``): drift weighting, drift response, local-only models;
  later behaviours join the same list;
- optionally ``ModelClusters`` (``server.clusters``): several global models, each reply
  aggregated into the one its client trained;
- optionally ``Staleness`` (``server.staleness``): buffered asynchronous aggregation, where
  a reply is an update of an older model and counts less the older it is;
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

from common.config import SAMPLE_EPSILON_KEY, RunConfig, check_server
from common.sections import DriftSettings, ServerSettings
from server.clusters import ModelClusters, cluster_reply
from server.drift_credit import DriftCredit
from server.history import RunHistory
from server.influence import InfluenceBound
from server.robust import AggregationRule, update_norm
from server.sampling import NodeSampling
from server.receipts import Receipts
from server.compressed_replies import DownlinkModel, payload_size, unpack_reply
from common.errors import require_opacus
from server.privacy import ClientLevelDP
from server.round_hooks import (
    ARRAYS_KEY, CONFIG_KEY, DriftResponse, DriftWeighting, LocalModels, PersonalHead, RoundHook, credited_report,
)
from server.server_step import ServerStep, server_step
from server.staleness import Staleness
from server.timing import PhaseTimes
from server.reply_metrics import SPENT, WEIGHT_KEY, MetricSpec, ReplyMetrics, describe_dropped
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
        clusters: ModelClusters | None = None,
        staleness: Staleness | None = None,
        codec: str = "none",
        privacy: ClientLevelDP | None = None,
        downlink: str = "none",
        sample_dp: bool = False,
    ) -> None:
        self.history = history
        self.privacy = privacy  # client-level DP: clipped, noised mean instead of the rule (server.privacy)
        self.codec = codec  # what clients send: weights, or packed updates (server.compressed_replies)
        self.downlink = DownlinkModel(downlink)  # what training messages carry: the model, or it packed
        self.sample_dp = sample_dp  # every reply must come from DP-SGD and say its epsilon
        self.traffic = {"up": 0, "replies": 0, "down": 0, "messages": 0}  # bytes of arrays, as sent
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
        self.clusters = clusters
        self.staleness = staleness
        self._claims: list[int] = []  # the cluster each accepted reply trained (clustered training)
        self._capped_weights = 0  # replies whose claimed weight the influence bound cut this round
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
        self.start_round(server_round, arrays)
        everyone = any(hook.sample_everyone(server_round) for hook in self.hooks)
        nodes = self.sampling.sample(grid, 1.0 if everyone else self.sampling.fraction_train, self.excluded)
        if nodes is None:
            log.error("round %d: every node is excluded; no client trains", server_round)
            return []
        self._sent = []
        return self.train_messages(server_round, arrays, config, nodes)

    def start_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """The global model the next aggregation starts from (``configure_train`` calls it;
        an asynchronous loop calls it before each update)."""
        if self.clusters is not None:
            self.clusters.start(arrays)
        self.validator.start_round(arrays)
        self._current = arrays
        self._reference = {name: array.numpy() for name, array in arrays.items()}
        self.step.start_round(server_round, self._reference)

    def train_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                       nodes: list[int]) -> list[Message]:
        """Training messages for ``nodes`` with the global model ``arrays``, as the hooks,
        the clusters and the receipts make them."""
        messages = self._messages(server_round, arrays, config, nodes, MessageType.TRAIN)
        for hook in self.hooks:
            messages = hook.configure(server_round, messages)
        if self.clusters is not None:
            messages = self.clusters.configure(messages)
        if self.staleness is not None:
            base = {name: array.numpy() for name, array in arrays.items()}
            for node in nodes:
                self.staleness.sent(node, base)
        stamped = self.receipts.stamp(messages)
        for message in stamped:
            self.traffic["down"] += payload_size(message.content)
            self.traffic["messages"] += 1
        self._sent = [m for m in self._sent if m.metadata.dst_node_id not in nodes] + stamped  # one per node
        return stamped

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
        if self.clusters is not None:  # a node evaluates the model it is served
            for message in messages:
                content = RecordDict(dict(message.content))
                content[ARRAYS_KEY] = self.clusters.models[self.clusters.home(message.metadata.dst_node_id)]
                message.content = content
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

    def aggregate_secure(self, server_round: int, mean_update: dict[str, np.ndarray], reports: list[Message],
                         weight_total: float) -> ArrayRecord | None:
        """A secure round's next model (``server.secure_round``): ``mean_update`` is the
        unmasked weighted mean of the updates of the nodes in ``reports`` (their float arrays;
        the rest keep the global model's), ``weight_total`` the sum of their weights. No
        individual update exists here: per-reply validation, the influence bound and the
        rules cannot run. The reports carry each node's metrics, in the clear; metrics the
        schema refuses are left out of the history (the node's update is in the sum already)."""
        with self.times.phase("aggregate"):
            accepted, spent = [], set()
            for reply in reports:
                node = reply.metadata.src_node_id
                checked = self.validator.schema.clean(reply.content[METRICS_KEY])
                if checked.reason is not None and checked.reason.startswith(SPENT):  # it sent nothing, weight 0
                    self._reject(server_round, node, checked.reason)
                    spent.add(node)
                    continue
                if checked.reason is not None:
                    log.warning("round %d: node %s's metrics left out: %s (its update is in the secure sum)",
                                server_round, self.history.label(node), checked.reason)
                    continue
                metrics = self.drift_credit.judge(server_round, node, checked.metrics, self.history.label(node))
                reply.content = RecordDict({METRICS_KEY: MetricRecord(metrics)})
                self.history.client_reply(node, metrics)
                accepted.append(reply)
            try:
                self.accepted_nodes = [reply.metadata.src_node_id for reply in reports
                                       if reply.metadata.src_node_id not in spent]
                if accepted:
                    self.history.train_metrics(dict(weighted_metrics([reply.content for reply in accepted])))
                reference = self._reference
                if self.privacy is not None:  # the clients clipped to --dp-clip and weigh 1: the mean times the count is the sum
                    total = {name: update * weight_total for name, update in mean_update.items()}
                    aggregate = self.privacy.aggregate_sum(server_round, total, reference, len(self._sent))
                    self.history.privacy_spent(self.privacy.epsilon())
                else:
                    aggregate = {name: reference[name] + mean_update[name] if name in mean_update else reference[name]
                                 for name in reference}
                new_model = self._stepped(server_round, aggregate)
                if new_model is None:
                    self._keep_global(server_round, "the secure aggregate holds NaN or Inf")
                    return None
                self.receipts.aggregated(server_round, self.accepted_nodes)
                return new_model
            finally:
                for hook in self.hooks:
                    hook.after_aggregate(server_round, accepted)

    def reject(self, server_round: int, node: int, reason: str) -> None:
        """Record that ``node``'s reply of this round was not used, and why (it counts towards
        ``--exclude-after``)."""
        self._reject(server_round, node, reason)

    def keep_global(self, server_round: int, reason: str) -> None:
        """This round leaves the global model as it was, for ``reason`` (in the log and history)."""
        self._keep_global(server_round, reason)

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

    def served_models(self, arrays: ArrayRecord, nodes: list[int]) -> dict[int, ArrayRecord]:
        """The model each of ``nodes`` is served after a round: its cluster's, its own (the
        local-only and personal-head references) or the global model ``arrays``."""
        if self.clusters is not None:
            return self.clusters.served(nodes)
        served = {node: arrays for node in nodes}
        for hook in self.hooks:
            served.update(hook.served_models(arrays, nodes))
        return served

    def state(self) -> dict[str, Any]:
        """Every part's state between rounds, merged (keys are unique across parts)."""
        out: dict[str, Any] = {}
        for part in self._parts:
            part_state = part.state()
            clash = set(part_state) & set(out)
            assert not clash, f"strategy parts share state keys {clash}"
            out.update(part_state)
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        for part in self._parts:
            part.load_state(state)

    @property
    def _parts(self) -> list[Any]:
        optional = [part for part in (self.clusters, self.staleness, self.privacy) if part is not None]
        return [self.step, self.receipts, self.drift_credit, *self.hooks, *optional]

    def run_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = self.drift_credit.summary()
        traffic = self.traffic
        if traffic["replies"] and traffic["messages"]:  # measured on what was sent, arrays only (no framing)
            out["uplink_bytes_per_client_round"] = traffic["up"] / traffic["replies"]
            out["downlink_bytes_per_client_round"] = traffic["down"] / traffic["messages"]
        for hook in self.hooks:
            out.update(hook.summary())
        if self.clusters is not None:
            out.update(self.clusters.summary())
        if self.privacy is not None:
            out.update(self.privacy.summary())
        return out

    # ---- the round's steps --------------------------------------------------
    def _messages(self, server_round, arrays, config, nodes, message_type) -> list[Message]:
        config.update(self.extra_config)
        config["server-round"] = server_round
        if message_type == MessageType.TRAIN and self.clusters is None:
            arrays = self.downlink.pack(arrays)  # the server keeps the full model; replies are read against it
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})  # one payload, shared
        return [Message(content=content, message_type=message_type, dst_node_id=node) for node in nodes]

    def _accept(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[Message], list[dict | None], list[float] | None]:
        """The replies that pass validation and the influence bound's outlier check, their
        decoded arrays (None past the budget) and their update norms (None when the bound
        reads none). An accepted reply's metrics are replaced by what the schema keeps of
        them, so that the hooks, the history and the summary read only checked values."""
        candidates: list[tuple[Message, Verdict, float, int]] = []
        excluded = self.excluded
        kept = 0  # bytes of decoded arrays kept for aggregation
        references: dict[int, dict[str, np.ndarray]] = {}
        for reply in replies:
            node = self._sender(reply)
            cluster, reference = 0, self._reference
            if node in excluded:
                verdict = Verdict("node is excluded after repeated rejected replies")
            elif reply.has_error():
                verdict = Verdict(f"client failed: {client_error(reply.error.code, reply.error.reason)}")
            else:
                if self.clusters is not None:
                    claimed, reason = self.clusters.claimed(reply.content, node)
                    if claimed is None:
                        self._reject(server_round, node, reason or "no cluster")
                        continue
                    cluster = claimed
                    reference = references.setdefault(cluster, self.clusters.reference(cluster))
                if self.staleness is not None:
                    reference = self.staleness.reference(node) or reference
                self.traffic["up"] += payload_size(reply.content)
                self.traffic["replies"] += 1
                unpacked, reason = unpack_reply(reply.content, reference, self.codec)
                if unpacked is None:
                    verdict = Verdict(reason)
                else:
                    reply.content = unpacked
                    verdict = self.validator.check(reply.content, reference if reference is not self._reference else None)
                    if verdict.reason is None and self.sample_dp and SAMPLE_EPSILON_KEY not in verdict.metrics:
                        verdict = Verdict("--dp sample: the reply reports no dp-epsilon (a client not training with "
                                          "DP-SGD?); its update would be outside the run's guarantee")
            if verdict.reason is not None:
                if self.staleness is not None:
                    self.staleness.rejected(node)
                self._reject(server_round, node, verdict.reason)
                continue
            if self.staleness is not None:  # from here on an update of the current model
                rebased, tau = self.staleness.rebase(node, verdict.arrays, self._reference)
                verdict = dataclasses.replace(verdict, arrays=rebased, metrics={**verdict.metrics, "staleness": tau})
                reference = self._reference
            norm = update_norm(verdict.arrays, reference) if self.influence.reads_norms else 0.0
            size = sum(a.nbytes for a in verdict.arrays.values())
            if kept + size <= DECODED_BUDGET or self.staleness is not None:  # rebased arrays exist only here
                kept += size
            else:
                verdict = dataclasses.replace(verdict, arrays=None)
            candidates.append((reply, verdict, norm, cluster))
        outliers = self.influence.outliers([norm for _, _, norm, _ in candidates])
        valid, decoded_arrays, norms = [], [], []
        self._claims = []
        for index, (reply, verdict, norm, cluster) in enumerate(candidates):
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
            self._claims.append(cluster)
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
        if self.clusters is not None:
            return self._aggregate_clusters(server_round, valid, decoded, norms)
        if (reason := self.rule.precondition(len(valid))) is not None:
            return self._keep_global(server_round, reason)
        contents = [reply.content for reply in valid]
        arrays = self._decoded(contents, decoded)
        weights = self._weights(contents)
        metrics = weighted_metrics(contents)
        self.history.train_metrics(dict(metrics))
        new_model, cut = self._combine(server_round, arrays, weights, self._reference, norms)
        if self._capped_weights or cut:
            self.history.influence_capped(self._capped_weights, cut)
        if new_model is None:
            return self._keep_global(server_round, "the aggregate holds NaN or Inf")
        return new_model, metrics

    def _aggregate_clusters(
        self, server_round: int, valid: list[Message], decoded: list[dict | None], norms: list[float] | None
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each cluster's replies aggregated into its own model; a reply that fits no model
        starts one (``server.clusters``). Returns the largest cluster's model as the global one."""
        assert self.clusters is not None
        contents = [reply.content for reply in valid]
        arrays = self._decoded(contents, decoded)
        weights = self._weights(contents)
        facts = [
            cluster_reply(reply.metadata.src_node_id, cluster, weight, dict(reply.content[METRICS_KEY]),
                          credited_report(reply.content), self.clusters.offered)
            for reply, cluster, weight in zip(valid, self._claims, weights)
        ]
        spawners = set(self.clusters.spawners(facts))
        # the caps work within each cluster: its replies' median norm (a cluster of one reply
        # moves only its own model, which other clients train only when it fits them best)
        aggregated: dict[int, ArrayRecord] = {}
        cuts = 0
        for cluster in sorted({f.cluster for i, f in enumerate(facts) if i not in spawners}):
            members = [i for i, f in enumerate(facts) if f.cluster == cluster and i not in spawners]
            model, cut = self._combine(server_round, [arrays[i] for i in members], [weights[i] for i in members],
                                       self.clusters.reference(cluster), [norms[i] for i in members] if norms else None)
            cuts += cut
            if model is None:
                log.warning("round %d: cluster %d's aggregate holds NaN or Inf; it stays as it was", server_round, cluster)
            else:
                aggregated[cluster] = model
        spawned = {i: self._as_global(arrays[i]) for i in spawners}
        if self._capped_weights or cuts:
            self.history.influence_capped(self._capped_weights, cuts)
        self.clusters.finish_round(server_round, facts, aggregated, spawned)
        metrics = weighted_metrics(contents) if contents else None
        if metrics is not None:
            self.history.train_metrics(dict(metrics))
        if not contents:
            return self._keep_global(server_round, "no reply was accepted")
        return self.clusters.models[self.clusters.largest()], metrics

    def _decoded(self, contents: list[RecordDict], decoded: list[dict | None]) -> list[dict[str, np.ndarray]]:
        return [
            known if known is not None else {name: a.numpy() for name, a in c[ARRAYS_KEY].items()}
            for known, c in zip(decoded, contents)
        ]

    def _weights(self, contents: list[RecordDict]) -> list[float]:
        """The replies' aggregation weights: claims capped by the influence bound, then the hooks'."""
        claims = [float(c.metric_records[METRICS_KEY][WEIGHT_KEY]) for c in contents]
        weights, capped = self.influence.cap_weights(claims)  # before the hooks: they weigh on purpose
        for hook in self.hooks:
            weights = hook.weights(contents, weights)
        if self.rule.weighs_replies:
            self.history.aggregation_weights(weights)
        self._capped_weights = capped
        return weights

    def _combine(self, server_round: int, arrays: list[dict[str, np.ndarray]], weights: list[float],
                 reference: dict[str, np.ndarray], norms: list[float] | None) -> tuple[ArrayRecord | None, int]:
        """The next model from these replies around ``reference`` (None when it is not
        finite), and how many updates the influence bound cut."""
        if self.privacy is not None:  # clipping bounds every reply: the influence bound's caps are off
            aggregate = self.privacy.aggregate(server_round, arrays, reference, len(self._sent))
            self.history.privacy_spent(self.privacy.epsilon())
            cut = 0
        else:
            arrays, cut = self.influence.cap_updates(arrays, reference, norms)
            aggregate = self.rule.aggregate(arrays, weights, reference)
        return self._stepped(server_round, aggregate), cut

    def _stepped(self, server_round: int, aggregate: dict[str, np.ndarray]) -> ArrayRecord | None:
        """The server step applied to ``aggregate``: the next global model, or None when it is
        not finite (then the step's state stays as it was: it moves on only with a kept model)."""
        before = self.step.state()
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is caught below
            new_model = self._as_global(self.step.apply(server_round, aggregate))
        if not all(np.isfinite(array.numpy()).all() for array in new_model.values()):
            self.step.load_state(before)
            return None
        return new_model

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
    training: str = "federated",
    concepts: int = 0,
    frozen: tuple[str, ...] = (),
    proximal_mu: float = 0.0,
    num_tasks: int | None = None,
    reply_metrics: dict[str, MetricSpec] | None = None,
    times: PhaseTimes | None = None,
    extra_hooks: Sequence[RoundHook] = (),
    compress: str = "none",
    compress_down: str = "none",
    sample_dp: bool = False,
    privacy: ClientLevelDP | None = None,
) -> FedtideStrategy:
    """fedtide's strategy from its settings, for ``run_federation`` or your own ServerApp.

    ``server``: sampling, server step, reply limits and aggregation rule; ``drift``: the
    server's drift reactions; ``min_nodes``: connected nodes a round waits for;
    ``training``: ``federated`` (one global model), ``clustered`` (several, see
    ``server.clusters``), or a reference: ``cluster-oracle`` (one model per concept;
    ``concepts`` of them), ``personal-head`` (each node keeps its own head), ``local-only``
    (each node keeps its own model);
    ``frozen``: parameter-name prefixes that keep their values; ``proximal_mu``: FedProx's
    term, sent to clients as ``proximal-mu`` with ``--strategy fedprox``; ``num_tasks``: the
    run's tasks, which bound a reply's ``task-id``; ``reply_metrics``: your clients' own
    metrics to keep, e.g. ``{"accuracy": MetricSpec("float", 0, 1)}`` (unknown metrics are
    dropped, see ``server.reply_metrics``); ``extra_hooks``: more round hooks, after fedtide's own;
    ``compress``: what the clients send (``none``: weights; ``int8``, ``int4``: packed updates)."""
    server = server or ServerSettings()
    drift = drift or DriftSettings()
    history = history or RunHistory()
    local_only = training == "local-only"
    replies = min_nodes if drift.react_server else max(int(min_nodes * server.fraction_train), 1)
    check_server(server, drift, replies, training, proximal_mu)
    hooks: list[RoundHook] = []
    if local_only:
        hooks.append(LocalModels())
    elif drift.drift_weight != 1.0:
        hooks.append(DriftWeighting(drift.drift_weight))
    if training == "personal-head":
        hooks.append(PersonalHead())
    if drift.react_server:
        hooks.append(DriftResponse(drift.drift_quorum, drift.drift_epoch_boost))
    hooks += extra_hooks
    clusters = None
    if training in ("clustered", "cluster-oracle"):
        clusters = ModelClusters(server.max_clusters, server.cluster_margin,
                                 oracle_concepts=concepts if training == "cluster-oracle" else 0)
    return FedtideStrategy(
        history=history,
        validator=ReplyValidator(server.max_num_examples, server.max_update_norm, server.max_reply_mb,
                                 ReplyMetrics(server.max_num_examples, num_tasks, reply_metrics)),
        sampling=NodeSampling(server.fraction_train, server.fraction_evaluate, min_nodes, server.client_wait),
        rule=AggregationRule() if local_only else AggregationRule.from_settings(server),
        influence=InfluenceBound(0, 0, 0) if local_only or privacy is not None else _influence(server, drift, clusters is not None,
                                                                      server.buffer_size > 0),
        step=ServerStep() if local_only else server_step(server.strategy, server.effective_server_lr,
                                                         server.server_momentum),
        hooks=hooks,
        exclude_after=server.exclude_after,
        frozen=frozen,
        extra_config={"proximal-mu": proximal_mu} if server.strategy == "fedprox" and not local_only else None,
        times=times,
        drift_credit=DriftCredit(drift.drift_evidence, drift.drift_follow_rounds),
        clusters=clusters,
        codec=compress,
        downlink=compress_down,
        sample_dp=sample_dp,
        privacy=privacy,
        staleness=Staleness(server.staleness_exponent) if server.buffer_size > 0 else None,
    )


def _influence(server: ServerSettings, drift: DriftSettings, clustered: bool = False,
               asynchronous: bool = False) -> InfluenceBound:
    """The run's influence bound. A drift reaction that trains a drifting client harder makes
    its honest update an outlier by design, and so does a client that moved to a concept no
    cluster knows yet (it spawns one) and, in asynchronous aggregation, a fresh reply among
    stale ones (each is scaled by its staleness): then the caps stay and the outlier rule is off."""
    outlier = server.norm_outlier
    if outlier and (drift.enlarges_updates or clustered or asynchronous):
        why = ("clients that fit no cluster" if clustered else "replies of different staleness" if asynchronous
               else "drift reactions")
        log.info("%s enlarge honest updates: --norm-outlier is off for this run (the caps stay)", why)
        outlier = 0.0
    return InfluenceBound(server.weight_cap, server.norm_cap, outlier)


def run_strategy(config: RunConfig, history: RunHistory, times: PhaseTimes | None = None,
                 extra_hooks: Sequence[RoundHook] = ()) -> FedtideStrategy:
    """The strategy of a fedtide run (``extra_hooks``: the run's own, e.g. serving releases)."""
    return build_strategy(
        config.server, config.drift, min_nodes=config.effective_min_clients, history=history,
        training=config.data.training, concepts=config.data.num_tasks, frozen=config.network.frozen_prefixes,
        proximal_mu=config.methods.options["prox-mu"], num_tasks=history.num_tasks, times=times,
        extra_hooks=extra_hooks, compress=config.learner.compress, privacy=client_dp(config),
        compress_down=config.learner.compress_down, sample_dp=config.privacy.dp == "sample",
    )


def client_dp(config: RunConfig) -> ClientLevelDP | None:
    """The run's client-level DP (``--dp client``), or None (``--dp sample``: Opacus checked
    here too, before a client trains)."""
    if config.privacy.dp == "sample":
        require_opacus()
    if config.privacy.dp != "client":
        return None
    require_opacus()
    p = config.privacy
    return ClientLevelDP(p.dp_clip, p.dp_noise, p.dp_delta, config.data.clients,
                         config.seed if p.dp_reproducible else None, p.target_epsilon)
