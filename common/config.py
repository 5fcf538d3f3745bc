"""One run's settings: the sections of ``common.sections`` and the method section, composed.

Every boundary (CLI flags, Flower's ``run_config``, a run folder's ``config.json``, bench's
``--set``) speaks flat kebab-case keys (``rounds-per-task``); ``RunConfig.from_mapping`` routes
each to its section, where it is typed and checked, and ``validate`` adds the rules that tie
sections together. Defaults live in the sections and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from common.errors import FedtideError
from common.method_registry import MethodSettings, method_settings
from common.sections import (
    DataSettings, DriftSettings, FaultSettings, LearnerSettings, ModelSettings, PrivacySettings, ReleaseSettings,
    RunSettings, ServerSettings,
)
from common.settings import Section, Setting

# sent with each round beside the settings: the model's shape, for edge clients that hold
# no copy of the dataset; the settings' digest, so a client parses them once per change; and
# a round's own instruction to one node: train this many times the local epochs (drift response)
INPUT_SHAPE_KEY, NUM_CLASSES_KEY, SETTINGS_HASH_KEY = "input-shape", "num-classes", "settings-hash"
EPOCH_BOOST_KEY = "epoch-boost"
# secure aggregation (server.secure_round, client.secure_aggregation): a secure round's training
# message tells each client the L2 norm to clip its update to before masking (0: none) and whether
# every update counts alike (client-level DP) instead of by its num-examples
SECURE_CLIP_KEY, SECURE_UNIT_WEIGHT_KEY = "secure-clip", "secure-unit-weight"
# clustered training (server.clusters, client.clusters): the training message carries every
# cluster's model as array record ``model-<id>`` and says how to choose (``loss`` or ``oracle``);
# the reply's metrics say which model was trained, its loss before training, and every offered
# model's loss (a list in the order of the cluster ids)
CANDIDATE_PREFIX, CHOICE_RULE_KEY = "model-", "cluster-choice"
CHOICE_KEY, LOSS_KEY, LOSSES_KEY = "cluster", "cluster-loss", "cluster-losses"
MAX_CLUSTERS = 64
# released models (server.release_delivery, client.released_model): a training message may carry the
# released model as array record ``released`` with config record ``release`` (its version and
# sha256); an edge client's reply says which version it holds (0: none) and how that version did
# on the labelled data that arrived this round, before training
RELEASED_KEY, RELEASE_INFO_KEY = "released", "release"
# a compressed reply (--compress, common.compression): its arrays record holds this one array
PACKED_NAME = "fedtide.packed-update"
PACKED_MODEL_NAME = "fedtide.packed-model"  # --compress-down: the global model, quantised and packed
HELD_VERSION_KEY, RELEASED_ACC_KEY = "released-version", "released-acc"
# --dp sample: a client's epsilon so far (its own accountant), and 1 when it stopped training at --target-epsilon
SAMPLE_EPSILON_KEY, DP_SPENT_KEY = "dp-epsilon", "dp-spent"
MAX_LOSS = 1e6  # the largest loss a reply may report (a diverged model's is reported as this)

# settings in the sections a client is sent that only the server reads: they are not sent
SERVER_ONLY = frozenset({"init-from", "react-server", "drift-quorum", "drift-epoch-boost", "drift-weight",
                         "drift-evidence"})

# RunConfig attribute -> section class
SECTIONS: dict[str, type[Section]] = {
    "data": DataSettings, "network": ModelSettings, "learner": LearnerSettings, "drift": DriftSettings,
    "server": ServerSettings, "privacy": PrivacySettings, "release": ReleaseSettings, "faults": FaultSettings,
    "run": RunSettings,
}


def section_settings() -> dict[str, Setting]:
    """The sections' settings and ``--method`` by flag name (no method's own settings)."""
    out: dict[str, Setting] = {}
    for section in SECTIONS.values():
        out.update(section.declarations())
    out["method"] = Setting("method", str, "replay", "continual-learning method(s), combined with + (e.g. replay+ewc)")
    return out


def all_settings() -> dict[str, Setting]:
    """Every flat setting of a run by flag name (sections', then the methods')."""
    return {**section_settings(), **method_settings()}


@dataclass(frozen=True)
class ClientSettings:
    """What a client needs to train and evaluate: the scenario (a simulated client builds its
    partition from it), the model, the local learner, the methods, drift detection, the seed.
    Server-only settings (robustness, timeouts, fault injection) never reach a client."""

    data: DataSettings = field(default_factory=DataSettings)
    network: ModelSettings = field(default_factory=ModelSettings)
    learner: LearnerSettings = field(default_factory=LearnerSettings)
    methods: MethodSettings = field(default_factory=MethodSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)
    seed: int = 0
    privacy: PrivacySettings = field(default_factory=PrivacySettings)  # --dp sample trains with DP-SGD

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in (self.data, self.network, self.learner, self.drift):
            out.update(section.to_flat())
        if self.privacy.dp == "sample":  # the client trains with DP-SGD; other levels stay on the server
            out.update(self.privacy.to_flat())
        out.update(self.methods.to_flat())
        out["seed"] = self.seed
        return {k: v for k, v in out.items() if k not in SERVER_ONLY}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], strict: bool = False) -> "ClientSettings":
        """From a server's config record; keys a client does not use are ignored (a plain
        Flower strategy adds its own, e.g. ``proximal-mu``). ``strict`` (settings a person
        wrote): snake_case is read as kebab-case, and an unknown key is an error."""
        flat = {str(k): v for k, v in mapping.items()}
        if strict:
            flat = {k.replace("_", "-"): v for k, v in flat.items()}
            known = set(all_settings()) - SERVER_ONLY - set(FaultSettings.declarations()) - set(
                ServerSettings.declarations()) - set(ReleaseSettings.declarations()) - {"out", "quiet", "metrics-address", "serve", "track", "track-uri"}
            unknown = sorted(set(flat) - known)
            if unknown:
                raise FedtideError(f"unknown client setting '{unknown[0]}': client settings are {', '.join(sorted(known))}")
        return cls(
            data=DataSettings.from_flat(flat), network=ModelSettings.from_flat(flat),
            learner=LearnerSettings.from_flat(flat), methods=MethodSettings.from_flat(flat),
            drift=DriftSettings.from_flat(flat), seed=RunSettings.declarations()["seed"].parse(flat.get("seed", 0)),
            privacy=PrivacySettings.from_flat(flat),
        )

    def digest(self) -> str:
        """A short hash of these settings: the same settings give the same digest."""
        text = json.dumps(self.to_mapping(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes. Same values, same seed: same numbers."""

    data: DataSettings = field(default_factory=DataSettings)
    network: ModelSettings = field(default_factory=ModelSettings)
    learner: LearnerSettings = field(default_factory=LearnerSettings)
    methods: MethodSettings = field(default_factory=MethodSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    release: ReleaseSettings = field(default_factory=ReleaseSettings)
    faults: FaultSettings = field(default_factory=FaultSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        self.validate()

    # ---- values that need several sections ---------------------------------
    @property
    def client(self) -> ClientSettings:
        """What its clients are sent: the server-only settings among the sections stay home."""
        defaults = {k: v.default for k, v in all_settings().items() if k in SERVER_ONLY}
        network = ModelSettings.from_flat({**self.network.to_flat(), **defaults})
        drift = DriftSettings.from_flat({**self.drift.to_flat(), **defaults})
        return ClientSettings(self.data, network, self.learner, self.methods, drift, self.run.seed, self.privacy)

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def num_rounds(self) -> int:
        return self.data.num_rounds

    @property
    def effective_min_clients(self) -> int:
        return self.server.min_clients or self.data.clients

    @property
    def max_replies_per_round(self) -> int:
        """The most training replies a round can bring: the nodes sampled (all of them
        after a drift quorum when the server reacts)."""
        if self.drift.react_server:
            return self.data.clients
        return max(int(self.data.clients * self.server.fraction_train), 1)

    @property
    def effective_concurrency(self) -> int:
        """Asynchronous aggregation: clients training at once (as many as a round samples by default)."""
        return self.server.concurrency or max(int(self.data.clients * self.server.fraction_train), 1)

    # ---- rules across sections ---------------------------------------------
    def validate(self) -> None:
        """Raise FedtideError naming the flags and what to change."""
        context = {name: value for section in (self.data, self.network, self.learner, self.drift, self.server,
                                               self.faults, self.run) for name, value in vars(section).items()}
        self.methods.check(context)
        server, drift, data = self.server, self.drift, self.data
        if server.min_clients > data.clients:
            raise FedtideError(
                f"--min-clients must be between 0 (all) and --clients {data.clients} (got {server.min_clients})"
            )
        if server.concurrency > data.clients:
            raise FedtideError(f"--concurrency {server.concurrency} is more than the {data.clients} clients: lower it")
        if server.buffer_size > self.effective_concurrency:
            raise FedtideError(f"--buffer-size {server.buffer_size} waits for more replies than the "
                               f"{self.effective_concurrency} clients in flight: lower it, or raise --concurrency")
        check_server(server, drift, self.max_replies_per_round, data.training,
                     self.methods.options["prox-mu"])
        if self.privacy.dp == "client":
            check_client_dp(server, drift, data.training)
        if self.privacy.dp == "sample":
            check_sample_dp([cls.name for cls in self.methods.active], data.training, self.methods.options["memory-fill"])
            check_sample_dp_inputs(self.methods.options["replay-loss"], drift, self.learner.lr_schedule,
                                   server.timed and self.privacy.target_epsilon > 0)
        if self.privacy.secure_aggregation:
            check_secure_aggregation(self)
        if self.learner.compress_down != "none" and data.training not in ("federated", "joint"):
            raise FedtideError(f"--compress-down packs the one global model; --training {data.training} sends several: "
                               "drop --compress-down")
        if self.learner.compress != "none" and data.training in ("local-only", "personal-head"):
            raise FedtideError(f"--compress sends updates against the global model, but --training {data.training} "
                               "sends each client a model of its own: drop --compress")
        attackers = self.faults.attacker_partitions
        if any(not 0 <= p < data.clients for p in attackers):
            raise FedtideError(
                f"attacking clients {sorted(attackers)} must be partition ids 0..{data.clients - 1} (--clients {data.clients})"
            )

    # ---- the flat boundary ---------------------------------------------------
    def to_mapping(self) -> dict[str, Any]:
        """Every setting by flag name (what ``config.json`` and Flower's run config hold)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out.update(getattr(self, name).to_flat())
        out.update(self.methods.to_flat())
        return out

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], ignore_unknown: bool = False, toml: bool = False) -> "RunConfig":
        """Build from kebab- or snake-case keys; an unknown key is an error unless
        ``ignore_unknown``. ``toml``: the mapping is a Flower run config, where TOML has no
        null and 0 stands for "the default" of a setting that says so (``memory-size``)."""
        flat = {str(key).replace("_", "-"): value for key, value in mapping.items()}
        known = all_settings()
        if toml:
            flat = {k: v for k, v in flat.items() if not (k in known and known[k].zero_means_default and v == 0)}
        unknown = sorted(set(flat) - set(known))
        if unknown and not ignore_unknown:
            raise FedtideError(f"unknown setting '{unknown[0]}': valid settings are {', '.join(sorted(known))}")
        sections = {name: section.from_flat(flat) for name, section in SECTIONS.items()}
        return cls(**sections, methods=MethodSettings.from_flat(flat))  # type: ignore[arg-type]

    @classmethod
    def of(cls, **settings: Any) -> "RunConfig":
        """A config from flat settings by snake-case name: ``RunConfig.of(num_tasks=3, memory_size=50)``."""
        return cls.from_mapping(settings)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with flat ``changes`` by snake-case name (``lr=0.05``, ``memory_size=50``)."""
        return self.from_mapping({**self.to_mapping(), **changes}) if changes else self


def check_server(server: ServerSettings, drift: DriftSettings, replies: int, training: str = "federated",
                 proximal_mu: float = 0.0) -> None:
    """The rules between the server's settings, its drift reactions and how many replies a
    round can bring; FedtideError naming the flags. ``RunConfig`` and ``build_strategy`` both
    apply them."""
    if server.strategy == "fedprox" and proximal_mu == 0:
        raise FedtideError("--strategy fedprox needs a proximal term: set --prox-mu (e.g. 0.01)")
    if drift.drift_weight != 1.0 and server.aggregation in ("median", "trimmed-mean"):
        raise FedtideError(
            f"--aggregation {server.aggregation} ignores reply weights, so --drift-weight would do nothing: "
            "use fedavg, multikrum or clip, or drop --drift-weight"
        )
    if training in ("clustered", "cluster-oracle"):
        if server.strategy not in ("fedavg", "fedprox"):
            raise FedtideError(f"--training {training} keeps no server optimizer state per cluster: use --strategy "
                               "fedavg or fedprox")
        if server.aggregation not in ("fedavg", "clip"):
            raise FedtideError(f"--training {training} aggregates each cluster's few replies on their own, too few for "
                               f"--aggregation {server.aggregation}: use fedavg or clip")
    if server.buffer_size > 0:
        if training != "federated":
            raise FedtideError(f"--buffer-size (asynchronous aggregation) trains one global model: drop --training {training}")
        if drift.react_server:
            raise FedtideError("--react-server samples every client in the next round; asynchronous aggregation has "
                               "no rounds to sample: drop --react-server or --buffer-size")
        if server.concurrency and server.buffer_size > server.concurrency:
            raise FedtideError(f"--buffer-size {server.buffer_size} waits for more replies than the --concurrency "
                               f"{server.concurrency} clients in flight: lower --buffer-size")
    if server.timed and server.fraction_evaluate > 0:
        raise FedtideError("--fraction-evaluate is for rounds in real time: drop it with --buffer-size or --speed-spread "
                           "(the server evaluates every round)")
    if drift.drift_weight != 1.0 and training == "local-only":
        raise FedtideError("--training local-only aggregates nothing, so --drift-weight would do nothing: drop it")
    if server.aggregation == "multikrum" and replies <= 2 * server.tolerated_attackers + 2:
        f = server.tolerated_attackers
        raise FedtideError(
            f"--aggregation multikrum with --tolerated-attackers {f} needs more than {2 * f + 2} replies "
            f"per round, but at most {replies} arrive: use --clients {2 * f + 3} or more "
            f"(and --fraction-train 1), or lower --tolerated-attackers"
        )
    if server.aggregation == "trimmed-mean":
        cut = trimmed_count(replies, server.trim_fraction)
        if replies - 2 * cut < 1:
            raise FedtideError(
                f"--aggregation trimmed-mean cuts {cut} of {replies} replies from each side and keeps none: "
                "use more --clients or a smaller --trim-fraction"
            )


def check_client_dp(server: ServerSettings, drift: DriftSettings, training: str) -> None:
    """What client-level DP cannot go with; FedtideError in one line naming the flag."""
    if server.aggregation != "fedavg":
        raise FedtideError(f"--dp client adds noise to a mean of clipped updates; --aggregation {server.aggregation} "
                           "is another estimator the noise does not cover: use --aggregation fedavg")
    if training not in ("federated", "joint"):
        raise FedtideError(f"--dp client protects one global model; --training {training} keeps several: drop one")
    if server.buffer_size > 0:
        raise FedtideError("--dp client accounts one step per synchronous round: drop --buffer-size")
    if drift.drift_weight != 1.0 or drift.react_server:
        raise FedtideError("--dp client counts every reply alike and samples at a fixed rate: drop --drift-weight and "
                           "--react-server")


def check_secure_aggregation(config: "RunConfig") -> None:
    """What secure aggregation (``server.secure_round``) cannot go with; FedtideError in one
    line naming the flag."""
    server, data = config.server, config.data
    if server.aggregation != "fedavg":
        raise FedtideError(f"--secure-aggregation shows the server only the sum of the updates; --aggregation "
                           f"{server.aggregation} needs each one: use --aggregation fedavg")
    if config.learner.compress != "none":
        raise FedtideError("--secure-aggregation masks the full quantised update; --compress sends packed codes that "
                           "cannot be masked: drop --compress")
    if server.timed:
        raise FedtideError("--secure-aggregation masks the updates of one synchronous round together: drop --buffer-size "
                           "and --speed-spread")
    if data.training != "federated":
        raise FedtideError(f"--secure-aggregation sums the updates of one global model; --training {data.training} "
                           "is not built for it: use --training federated")
    if config.drift.drift_weight != 1.0:
        raise FedtideError("--secure-aggregation applies each update's weight on the client, inside the mask, so "
                           "--drift-weight cannot reweigh it: drop --drift-weight")
    if 0 < config.privacy.secure_max_weight < 1:
        raise FedtideError(f"--secure-max-weight {config.privacy.secure_max_weight:g} would weigh every client 0: use 0 "
                           "(automatic) or 1 or more")
    replies = config.max_replies_per_round
    if replies < 3:
        raise FedtideError(f"--secure-aggregation needs at least 3 clients a round (the sum of two updates gives each "
                           f"away); a round samples {replies}: raise --clients or --fraction-train")
    if replies > 1023:
        raise FedtideError(f"--secure-aggregation sums at most 1023 masked updates a round (32-bit masks); a round "
                           f"samples {replies}: lower --fraction-train")


SAMPLE_DP_METHODS = ("replay", "der", "lwf")  # their losses are sums of per-sample terms


def check_sample_dp(methods: list[str], training: str, memory_fill: str) -> None:
    """What DP-SGD on the clients (``client.dp_sgd``) cannot go with; FedtideError in one line."""
    if memory_fill == "stream" and any(name in ("replay", "der") for name in methods):
        raise FedtideError("--dp sample accounts each sample once per step; with --memory-fill stream a task's samples "
                           "are memories while they are still its data, drawn twice: use --memory-fill boundary")
    other = [name for name in methods if name not in SAMPLE_DP_METHODS]
    if other:
        flag = "--prox-mu" if other[0] == "prox" else f"--method {other[0]}"
        raise FedtideError(f"--dp sample clips each sample's gradient; {flag} adds a penalty that is not a per-sample "
                           f"loss, which clipping would drop: use --method {', '.join(SAMPLE_DP_METHODS)} or naive")
    if training not in ("federated", "joint"):
        raise FedtideError(f"--dp sample trains the federated model with DP-SGD; --training {training} is not built "
                           "for it: use --training federated")


def check_sample_dp_inputs(replay_loss: str, drift: DriftSettings, lr_schedule: str, timed_target: bool) -> None:
    """What would let the raw data steer training past DP-SGD's clipping and noise, or a target
    that cannot stop the run; FedtideError in one line."""
    if replay_loss == "ace":
        raise FedtideError("--dp sample bounds each sample's part of a step; --replay-loss ace masks every new "
                           "sample's loss by the classes the others bring: use --replay-loss ce")
    if drift.react_extra_epochs or drift.react_lr_boost != 1.0:
        raise FedtideError("--dp sample: --react-extra-epochs and --react-lr-boost train harder on a verdict read from "
                           "the raw data, outside the guarantee: drop them")
    if lr_schedule == "plateau":
        raise FedtideError("--dp sample: --lr-schedule plateau follows the noise-free training loss, outside the "
                           "guarantee: use constant or restart")
    if timed_target:
        raise FedtideError("--dp sample with --target-epsilon stops synchronous rounds: drop --buffer-size and "
                           "--speed-spread, or --target-epsilon")


def trimmed_count(replies: int, trim_fraction: float) -> int:
    """Replies a trimmed mean cuts from each side: ceil(fraction * replies), at least one
    whenever the fraction is > 0 (so that trimming never silently turns into a plain mean)."""
    if trim_fraction <= 0:
        return 0
    return max(1, math.ceil(trim_fraction * replies - 1e-9))
