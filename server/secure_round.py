"""Secure aggregation rounds (``--secure-aggregation``): the server learns the sum of a
round's updates and nothing of any one of them.

A secure round runs Flower's SecAgg+ (``SecAggPlusWorkflow``) over the run's Grid in four
stages: key setup, key shares, masked updates, unmasking. The clients train in the third
stage, on the same training messages a plain round sends (the strategy's ``configure_train``:
sampling, drift reactions, receipts), and answer with their update masked
(``client.secure_aggregation``). The workflow belongs to Flower's older API: it asks a legacy
strategy for the round's clients and hands it the unmasked result. ``_Handover`` is that
strategy: it names the nodes ``configure_train`` chose and keeps the weighted mean of their
updates, which ``FedtideStrategy.aggregate_secure`` turns into the next model with the run's
server step (and client-level DP's noise on the sum).

Every reply is a stranger's: ``CheckedStages`` (a Grid wrapper) checks each stage's replies
before the workflow reads them (types, sizes, node ids, the masked vector's shapes and
range), and a bad one is dropped like a client that never answered, which SecAgg+ recovers
from as long as enough key shares answer. Whatever still fails ends the round with the
global model unchanged and the reason in the history; it never stops the run.

Each key stage waits at most a quarter of ``--round-timeout``; the masked-update stage, in
which the clients train, waits the whole of it.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.secure_aggregation import SECURE_CONFIGS, float_names
from common.config import SECURE_CLIP_KEY, SECURE_UNIT_WEIGHT_KEY
from server.grids import GridWrapper
from server.reply_metrics import WEIGHT_KEY
from server.validation import METRICS_KEY, client_error

log = logging.getLogger("fedtide.server")

MIN_CLIENTS = 3  # with fewer, the sum of the others' updates gives each one away
MOD_RANGE = 2**32  # the masks' modulus
QUANTIZATION = 2**22  # levels each clipped value is quantised to
CLIPPING_RANGE = 8.0  # each weighted update value is clipped to [-8, 8] before quantising
MAX_CLIENTS = MOD_RANGE // QUANTIZATION - 1  # more quantised vectors than this overflow the modulus
MAX_KEY_BYTES = 1024  # a public key, a key share or one encrypted share, far above their real size
FIRST_MAX_WEIGHT = 10_000.0  # automatic max weight before any count is known
MEDIAN_FACTOR = 4  # automatic max weight: this many times the median count of the round before


def shares_for(clients: int) -> int:
    """Key shares per client: all clients up to 9, else an odd 2 log2(n) + 1 neighbours."""
    if clients <= 9:
        return clients
    shares = 2 * math.ceil(math.log2(clients)) + 1
    return min(shares | 1, clients)


@dataclass
class SecureRound:
    """One secure round's driver; ``strategy`` is the run's ``FedtideStrategy``.
    ``clip``: the L2 norm each client clips its update to (0: none); ``unit_weight``: every
    update counts 1 (client-level DP); ``max_weight``: the most a client's num-examples counts
    (0: automatic, ``weight_for``); ``timeout``: the round's timeout (seconds)."""

    strategy: Any
    timeout: float
    max_weight: float
    clip: float = 0.0
    unit_weight: bool = False
    traffic: dict[str, int] = field(default_factory=lambda: {"down": 0, "up": 0})  # bytes of all stages, as sent
    client_rounds: int = 0  # training messages sent in secure rounds
    failed_rounds: int = 0  # rounds that kept the global model
    last_counts: list[int] = field(default_factory=list)  # num-examples the last round's masked replies claimed

    def weight_for(self) -> float:
        """The round's max weight: fixed, or 4 x the median num-examples the previous round's
        clients reported (in the clear), so that quantisation is fine and one liar cannot
        coarsen it (a run resumed from a checkpoint older than this state starts again at 10,000)."""
        if self.max_weight > 0:
            return self.max_weight
        if not self.last_counts:
            return FIRST_MAX_WEIGHT
        return float(max(1, MEDIAN_FACTOR * int(np.median(self.last_counts))))

    def __call__(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord | None:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if not MIN_CLIENTS <= len(messages) <= MAX_CLIENTS:
            self.failed_rounds += 1
            self.strategy.keep_global(server_round, f"secure aggregation sums {MIN_CLIENTS} to {MAX_CLIENTS} updates a "
                                                    f"round; {len(messages)} clients were sampled")
            return None
        contents = {m.metadata.dst_node_id: self._content(m.content) for m in messages}
        self.client_rounds += len(contents)
        names = float_names(arrays)
        shapes = [tuple(arrays[name].shape) for name in names]
        checked = CheckedStages(grid, set(contents), shapes, self.traffic)
        handover = _Handover(sorted(contents))
        try:
            outcome = self._run(checked, server_round, contents, handover)
        except Exception as error:  # noqa: BLE001 - whatever the replies hold, the run goes on
            outcome = f"secure aggregation failed: {type(error).__name__}: {str(error)[:200]}"
        for node, reason in checked.dropped:
            self.strategy.reject(server_round, node, reason)
        if isinstance(outcome, str):
            self.failed_rounds += 1
            self.strategy.keep_global(server_round, outcome)
            return None
        mean, weight_total = outcome
        if self.unit_weight:  # each update counts 1: the sum is the mean times the updates in it
            weight_total = float(len(checked.masked))
        if len(mean) != len(names) or any(a.shape != s for a, s in zip(mean, shapes)):
            self.failed_rounds += 1
            self.strategy.keep_global(server_round, "the secure aggregate does not fit the model")
            return None
        counts = [reply.content.config_records["fitres.metrics"].get(WEIGHT_KEY) for reply in checked.masked]
        self.last_counts = [c for c in counts if _whole(c, 10**9) and c > 0]
        if self.clip > 0 and (norm := float(np.sqrt(sum(float(np.sum(a * a)) for a in mean)))) > self.clip * 1.01 + 0.01:
            self.failed_rounds += 1  # a mean of updates clipped to C is no longer than C: a share or mask was wrong
            self.strategy.keep_global(server_round, f"the secure aggregate's norm {norm:.3g} exceeds the clients' clip "
                                                    f"{self.clip:g}: a key share or mask was wrong")
            return None
        reports = [self._report(reply) for reply in checked.masked]
        model = self.strategy.aggregate_secure(server_round, dict(zip(names, mean)), reports, weight_total)
        self.failed_rounds += model is None
        return model

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run quantises as the uninterrupted one
        (its next max weight) and reports the whole run's traffic and failures."""
        return {"last_counts": list(self.last_counts), "traffic": dict(self.traffic),
                "client_rounds": self.client_rounds, "failed_rounds": self.failed_rounds}

    def load_state(self, state: Any) -> None:
        """``state()`` from a checkpoint; a value of the wrong kind or out of bounds is left at
        its start value (a checkpoint is checksummed, but its JSON is still read as input)."""
        if not isinstance(state, dict):
            return
        counts = state.get("last_counts")
        if isinstance(counts, list) and len(counts) <= MAX_CLIENTS and all(_whole(c, 10**9) and c > 0 for c in counts):
            self.last_counts = list(counts)
        traffic = state.get("traffic")
        if isinstance(traffic, dict) and set(traffic) == {"down", "up"} and all(_whole(v, 2**62) for v in traffic.values()):
            self.traffic = dict(traffic)
        for name in ("client_rounds", "failed_rounds"):
            if _whole(state.get(name), 2**62):
                setattr(self, name, state[name])

    def summary(self) -> dict[str, Any]:
        """Figures for the run's summary: what the protocol's four stages carried per client
        and round (arrays, keys, shares and masked vectors; no framing)."""
        per = max(self.client_rounds, 1)
        return {"secure_aggregation": {
            "protocol": "SecAgg+ (Flower)", "failed_rounds": self.failed_rounds,
            "bytes_down_per_client_round": self.traffic["down"] / per,
            "bytes_up_per_client_round": self.traffic["up"] / per,
        }}

    def _content(self, content: RecordDict) -> RecordDict:
        """A node's training message for the masked stage: its own copy (the workflow adds
        the stage's record to it), with the bounds the client applies before masking."""
        own = RecordDict(dict(content))
        config = ConfigRecord(dict(content["config"]))
        config[SECURE_CLIP_KEY] = float(self.clip)
        config[SECURE_UNIT_WEIGHT_KEY] = bool(self.unit_weight)
        own["config"] = config
        return own

    def _run(self, grid: "CheckedStages", server_round: int, contents: dict[int, RecordDict],
             handover: "_Handover") -> tuple[list[np.ndarray], float] | str:
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState

        shares = shares_for(len(contents))
        workflow = SecAggPlusWorkflow(
            num_shares=shares, reconstruction_threshold=2 / 3, max_weight=self.weight_for(),
            clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION, modulus_range=MOD_RANGE,
        )
        state = RecordDict({
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        })
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                                strategy=handover,  # type: ignore[arg-type]
                                client_manager=SimpleNamespace(num_available=lambda: len(contents)))  # type: ignore[arg-type]
        progress = WorkflowState()
        key_wait = self.timeout / 4
        stages = (("key setup", workflow.setup_stage, key_wait), ("key sharing", workflow.share_keys_stage, key_wait),
                  ("masked updates", workflow.collect_masked_vectors_stage, self.timeout),
                  ("unmasking", workflow.unmask_stage, key_wait))
        for name, stage, wait in stages:
            workflow.timeout = wait
            if not stage(grid, context, progress):
                return (f"secure aggregation stopped at {name}: too few clients answered "
                        f"({len(progress.active_node_ids)} of {len(contents)}) to recover the sum")
            if name == "key setup":  # the masked stage sends each node its own training message
                progress.nid_to_fitins = {node: contents[node] for node in progress.nid_to_fitins}
            if name == "key sharing":
                _forget_early_dropouts(progress)
            if name == "masked updates" and len(progress.active_node_ids) < MIN_CLIENTS:
                return (f"secure aggregation stopped before unmasking: {len(progress.active_node_ids)} masked "
                        f"update(s) arrived, and the sum of fewer than {MIN_CLIENTS} gives each away")
        if handover.mean is None:
            return "secure aggregation returned no aggregate"
        return handover.mean, handover.weight_total

    @staticmethod
    def _report(reply: Message) -> Message:
        """A masked reply as the strategy reads a plain one: only its metrics (in the clear)."""
        metrics = dict(reply.content.config_records["fitres.metrics"])
        reply.content = RecordDict({METRICS_KEY: MetricRecord(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float, list)) and not isinstance(v, bool)})})
        return reply


def _forget_early_dropouts(progress: Any) -> None:
    """Leave out of the round the nodes that dropped out before their key shares went out.

    No client masks its update with such a node (it never got that node's share), and no one
    holds a share of its keys. Flower's workflow (1.42) still counts it among the round's
    nodes: at unmasking it would look for the dropped node's shares, find none, and give up
    the whole round (or, as another node's neighbour, remove a mask no one added). From here
    on the round's nodes are those whose shares are out."""
    survivors = set(progress.active_node_ids)
    progress.sampled_node_ids = survivors
    progress.nid_to_neighbours = {node: neighbours & survivors for node, neighbours in progress.nid_to_neighbours.items()
                                  if node in survivors}


class _Handover:
    """The legacy strategy SecAggPlusWorkflow talks to: the round's nodes (already chosen by
    ``configure_train``) and the unmasked result it hands back."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.mean: list[np.ndarray] | None = None
        self.weight_total = 0.0

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns, Parameters

        return [(SimpleNamespace(node_id=node), FitIns(Parameters(tensors=[], tensor_type=""), {}))
                for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        if results:
            self.mean = [np.asarray(a, np.float64) for a in parameters_to_ndarrays(results[0][1].parameters)]
            self.weight_total = float(sum(fitres.num_examples for _, fitres in results))
        return None, {}


class CheckedStages(GridWrapper):
    """The Grid as the SecAgg+ workflow sees it: each stage's replies checked before it reads
    them. A reply that fails is left out (``dropped``: node, reason), as if it never came."""

    def __init__(self, inner: Grid, nodes: set[int], shapes: list[tuple[int, ...]], traffic: dict[str, int]) -> None:
        super().__init__(inner)
        self.nodes = nodes
        self.shapes = [(1,), *shapes]  # the masked vector starts with the weight
        self.traffic = traffic
        self.dropped: list[tuple[int, str]] = []
        self.masked: list[Message] = []  # the masked stage's replies that passed

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stage = str(messages[0].content.config_records[SECURE_CONFIGS]["stage"]) if messages else ""
        expected: dict[int, set[int]] = {}  # the node ids each node's reply must name
        for message in messages:  # the workflow shares one record among nodes, and Flower's mod edits it
            content = RecordDict(dict(message.content))
            record = ConfigRecord(dict(content.config_records[SECURE_CONFIGS]))
            content[SECURE_CONFIGS] = record
            message.content = content
            node = message.metadata.dst_node_id
            if stage == "share_keys":  # a share for each neighbour whose keys it was sent, itself excepted
                expected[node] = {int(key) for key in record if key != "stage"} - {node}
            elif stage == "unmask":  # a share of each neighbour it was asked about
                expected[node] = {*record.get("active_nids", []), *record.get("dead_nids", [])}
        self.traffic["down"] += sum(_size(m.content) for m in messages)
        kept, seen, keys = [], set(), set()
        for reply in self.inner.send_and_receive(messages, timeout=timeout):
            if reply.has_error():  # a dropout (it may be a peer's bad key that failed it: no blame)
                log.warning("secure aggregation, %s: node %s failed: %s", stage, _sender(reply, messages),
                            client_error(reply.error.code, reply.error.reason))
                kept.append(reply)
                continue
            self.traffic["up"] += _size(reply.content)
            node = reply.metadata.src_node_id
            try:
                reason = self._check(stage, reply.content, expected.get(node, set()), keys)
            except Exception as error:  # noqa: BLE001 - a reply the checks cannot read is a bad reply
                reason = f"unreadable {stage} reply ({type(error).__name__})"
            if reason is None and (node not in self.nodes or node in seen):
                reason = "not a node of this round, or its second reply"
            if reason is not None:
                self.dropped.append((node, f"secure aggregation, {stage}: {reason}"))
                continue
            seen.add(node)
            kept.append(reply)
            if stage == "collect_masked_vectors":
                self.masked.append(reply)
        return kept

    def _check(self, stage: str, content: RecordDict, expected: set[int], keys: set[bytes]) -> str | None:
        if SECURE_CONFIGS not in content.config_records:
            return "no SecAgg+ record"
        record = content.config_records[SECURE_CONFIGS]
        if stage == "setup":
            return _public_keys(record, keys)
        if stage == "share_keys":
            return _lists(record, "dsts", "ctxts", expected)
        if stage == "collect_masked_vectors":
            return self._check_masked(content, record)
        if stage == "unmask":
            return _lists(record, "nids", "shares", expected)
        return f"unknown stage {stage[:30]!r}"

    def _check_masked(self, content: RecordDict, record: ConfigRecord) -> str | None:
        vectors = record.get("masked_params")
        if not isinstance(vectors, list) or len(vectors) != len(self.shapes):
            return f"the masked update must be {len(self.shapes)} arrays"
        for blob, shape in zip(vectors, self.shapes):
            if not isinstance(blob, bytes) or len(blob) > 8 * math.prod(shape) + 256:
                return "a masked array is not bytes of its size"
            array = np.load(io.BytesIO(blob), allow_pickle=False)
            if array.shape != shape or array.dtype != np.int64:
                return f"a masked array has shape {array.shape} and dtype {array.dtype}, not {shape} int64"
            if array.size and (int(array.min()) < 0 or int(array.max()) >= MOD_RANGE):
                return "a masked array holds values outside the masks' range"
        count = content.metric_records.get("fitres.num_examples")
        status = content.config_records.get("fitres.status")
        metrics = content.config_records.get("fitres.metrics")
        if count is None or status is None or metrics is None or "fitres.parameters" not in content.array_records:
            return "the reply lacks Flower's FitRes records"
        if list(content.array_records) != ["fitres.parameters"] or len(content.array_records["fitres.parameters"]):
            return "a masked reply must hold no arrays in the clear"
        examples = count.get("num_examples")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
            return "num_examples must be a whole number >= 0"
        if status.get("code") != 0 or isinstance(status.get("code"), bool) or not isinstance(status.get("message"), str):
            return "its status must be code 0 (OK) and a message"
        if len(metrics) > 256 or any(isinstance(v, bytes) or not isinstance(v, (int, float, str)) for v in metrics.values()):
            return "its metrics must be at most 256 numbers"  # the legacy layout takes single values only
        return None


def _whole(value: Any, most: int) -> bool:
    """A whole number (not a bool) from 0 to ``most``."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


def _sender(reply: Message, sent: list[Message]) -> int:
    """The node an error reply is about (the SuperLink answers for a node it lost)."""
    for message in sent:
        if message.metadata.message_id and message.metadata.message_id == reply.metadata.reply_to_message_id:
            return message.metadata.dst_node_id
    return reply.metadata.src_node_id


def _public_keys(record: ConfigRecord, seen: set[bytes]) -> str | None:
    """A setup reply: two distinct public keys that parse, neither seen before this round
    (a repeated or malformed key would fail every honest neighbour at the next stage)."""
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    pair = [record.get("pk1"), record.get("pk2")]
    for key in pair:
        if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
            return f"its public keys must be at most {MAX_KEY_BYTES} bytes each"
    if pair[0] == pair[1] or seen & set(pair):
        return "its public keys repeat a key of this round"
    try:
        for key in pair:
            bytes_to_public_key(key)
    except Exception:  # noqa: BLE001 - not a key
        return "its public keys do not parse"
    seen.update(pair)
    return None


def _lists(record: ConfigRecord, ids_key: str, blobs_key: str, expected: set[int]) -> str | None:
    """Key sharing and unmasking: one entry for each node it was asked about, no other."""
    ids, blobs = record.get(ids_key), record.get(blobs_key)
    if not isinstance(ids, list) or not isinstance(blobs, list) or len(ids) != len(blobs):
        return f"'{ids_key}' and '{blobs_key}' must be lists of the same length"
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids) or len(set(ids)) != len(ids) \
            or set(ids) != expected:
        return f"'{ids_key}' must name each node it was asked about once, and no other"
    if any(not isinstance(b, bytes) or not 0 < len(b) <= MAX_KEY_BYTES for b in blobs):
        return f"each of '{blobs_key}' must be at most {MAX_KEY_BYTES} bytes"
    return None


def _size(content: RecordDict) -> int:
    """Bytes of a message's arrays and byte-valued configs (keys, shares, masked vectors)."""
    arrays = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    blobs = 0
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                blobs += len(value)
            elif isinstance(value, list):
                blobs += sum(len(v) for v in value if isinstance(v, bytes))
    return arrays + blobs


def secure_round(config: Any, strategy: Any) -> SecureRound | None:
    """The run's secure round (``--secure-aggregation``), or None for plain rounds. Each
    client clips its update to ``--dp-clip`` under client-level DP (and weighs 1), else to
    ``--max-update-norm`` when set."""
    privacy, server = config.privacy, config.server
    if not privacy.secure_aggregation:
        return None
    off = [flag for flag, value in (("--norm-cap", server.norm_cap), ("--norm-outlier", server.norm_outlier),
                                    ("--weight-cap", server.weight_cap)) if value]
    if off:
        log.info("secure aggregation: %s read single updates and do not apply; clients clip their own updates "
                 "(--max-update-norm, --dp-clip)", ", ".join(off))
    client_dp = privacy.dp == "client"
    return SecureRound(strategy, timeout=server.round_timeout, max_weight=1.0 if client_dp else privacy.secure_max_weight,
                       clip=privacy.dp_clip if client_dp else server.max_update_norm, unit_weight=client_dp)
