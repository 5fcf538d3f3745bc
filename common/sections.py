"""The run's settings in sections, each a small frozen object that checks its own values.

A function receives the section it uses (the scenario its ``DataSettings``, the strategy
its ``ServerSettings``), never the whole run. Rules that tie several sections together live
in ``common.config.RunConfig``; a method's own settings live with the method
(``common.method_registry``). The flag of a field is its name in kebab case.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import FedtideError
from common.settings import Section, setting

SCENARIOS = ("class-incremental", "domain-incremental", "concept-drift", "dataset-switch", "distributed-drift")
DOMAIN_TRANSFORMS = ("rotation", "permutation")
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam")
MODELS = ("mlp", "cnn")
DATASETS = ("digits", "mnist", "fashion-mnist")
OPTIMIZERS = ("sgd", "adam")
# federated: one global model; clustered: several, each client picks its own; references beside them
TRAINING_MODES = ("federated", "clustered", "cluster-oracle", "personal-head", "local-only", "joint")
LR_SCHEDULES = ("constant", "restart", "plateau")
# River's, on the prequential error stream; fedtide's round-level tests (client.drift_signals)
RIVER_DETECTORS = ("adwin", "page-hinkley", "ddm", "eddm", "hddm-a", "hddm-w")
ROUND_DETECTORS = ("accuracy-or-inputs", "accuracy-drop", "confidence-drop", "input-shift")
DRIFT_DETECTORS = (*RIVER_DETECTORS, *ROUND_DETECTORS, "none")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "multikrum", "clip")
ATTACKS = ("none", "sign-flip", "flip-scale", "scale", "noise", "nan", "inf", "wrong-shape", "lie-num-examples", "label-flip",
           "replace", "backdoor", "drift-liar", "drift-faker", "drift-follower")


@dataclass(frozen=True)
class DataSettings(Section):
    """What each client sees: the dataset, how it drifts task by task, how it is split."""

    dataset: str = setting("digits", "digits (embedded, no download), mnist or fashion-mnist (IDX files in --data-dir)",
                           choices=DATASETS)
    data_dir: str = setting("", "folder with the IDX files of mnist / fashion-mnist (default: $FEDTIDE_DATA_DIR)")
    normalize: bool = setting(False, "standardize pixels with the training set's mean and std")
    pad_to: int = setting(0, "zero-pad images to this size, e.g. 32 (0: keep)", minimum=0, maximum=1024)
    scenario: str = setting("class-incremental", f"kind of drift: {', '.join(SCENARIOS)}", choices=SCENARIOS)
    second_dataset: str = setting("fashion-mnist", "dataset-switch: the dataset odd tasks come from", choices=DATASETS)
    num_tasks: int = setting(5, "number of tasks in the sequence", minimum=1, maximum=10_000)
    domain_transform: str = setting("rotation", "input transform per task for domain-incremental: "
                                    f"{', '.join(DOMAIN_TRANSFORMS)}", choices=DOMAIN_TRANSFORMS)
    clients: int = setting(5, "number of clients", minimum=1, maximum=1_000_000)
    client_samples: int = setting(0, "training samples each client keeps (0: its whole share of the dataset)", minimum=0)
    iid: bool = setting(False, "split data IID across clients (default: Dirichlet over labels, see --alpha)")
    alpha: float = setting(1.0, "Dirichlet concentration of the non-IID split (> 0; small = more skewed)",
                           minimum=0, above=True, hint="small values (0.1) give very non-IID clients, large ones "
                           "(100) nearly IID; use --iid for an IID split")
    rounds_per_task: int = setting(8, "federated rounds on each task", minimum=1, maximum=1_000_000)
    async_spread: int = setting(0, "asynchronous drift: each client switches tasks up to this many rounds late "
                                "(0: together)", minimum=0, maximum=1_000_000)
    concept_switches: int = setting(3, "distributed-drift: concept switches per client, one every --rounds-per-task "
                                    "rounds (staggered by --async-spread)", minimum=1, maximum=10_000)
    concept_recur: float = setting(0.5, "distributed-drift: chance that a switch goes back to a concept the client "
                                   "had before", minimum=0, maximum=1)
    training: str = setting("federated", "federated (one global model); clustered (several global models, each client "
                            "trains the one that fits its new data best: for clients on different concepts at once); or "
                            "a reference: cluster-oracle (one model per concept, clients told their concept: "
                            "simulation only), personal-head (a shared body, each client its own head), local-only "
                            "(no federation), joint (all tasks at once, no drift)", choices=TRAINING_MODES)

    def check(self) -> None:
        if self.scenario == "distributed-drift" and self.num_tasks < 2:
            raise FedtideError("--scenario distributed-drift moves clients between concepts: use --num-tasks 2 or more")
        if self.training == "cluster-oracle" and self.scenario != "distributed-drift":
            raise FedtideError("--training cluster-oracle knows each client's concept only in --scenario "
                               "distributed-drift: use --training clustered")

    @property
    def segments(self) -> int:
        """How many task periods each client goes through."""
        return self.concept_switches + 1 if self.scenario == "distributed-drift" else self.num_tasks

    @property
    def num_rounds(self) -> int:
        return self.segments * self.rounds_per_task + self.async_spread


@dataclass(frozen=True)
class ModelSettings(Section):
    """The model server and clients share."""

    model: str = setting("mlp", f"model: {', '.join(MODELS)}", choices=MODELS)
    hidden: str = setting("128,128", "hidden layer widths, comma-separated")
    init_from: str = setting("", "start from these weights (a .safetensors file, e.g. a run folder's model.safetensors)")
    freeze: str = setting("", "comma-separated parameter-name prefixes clients do not train, e.g. features.1")

    def check(self) -> None:
        try:
            widths = self.hidden_widths
        except ValueError:
            widths = ()
        if not widths or min(widths) <= 0 or max(widths) > 65_536 or len(widths) > 64:
            raise FedtideError(f"--hidden '{self.hidden}' is not a list of positive layer widths: use e.g. 256,128")

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.hidden.split(",") if w.strip())

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.freeze.split(",") if p.strip())


@dataclass(frozen=True)
class LearnerSettings(Section):
    """How a client trains locally each round."""

    optimizer: str = setting("sgd", f"client optimizer: {', '.join(OPTIMIZERS)}", choices=OPTIMIZERS)
    local_epochs: int = setting(5, "local epochs per round", minimum=1, maximum=10_000)
    lr: float = setting(0.1, "client learning rate", minimum=0, above=True)
    lr_schedule: str = setting("constant", "constant; restart (cosine over each task, restarting at a switch); "
                               "plateau (halve when the loss stalls, reset at a switch)", choices=LR_SCHEDULES)
    batch_size: int = setting(16, "client batch size", minimum=1, maximum=1_000_000)
    device: str = setting("auto", "auto (CUDA if available), cpu, cuda or cuda:N")
    compress: str = setting("none", "what a client sends: none (its weights), int8 or int4 (its update, quantised per "
                            "chunk of 256 with error feedback, packed with zstandard: about 4x / 9x fewer bytes)",
                            choices=("none", "int8", "int4"))
    compress_down: str = setting("none", "what the server sends for training: none (the model's weights) or int8 (the "
                                 "model quantised per chunk of 256, packed: about 4x fewer bytes; the server keeps the "
                                 "full model and reads each reply against it); needs --compress", choices=("none", "int8"))

    def check(self) -> None:
        if self.compress_down != "none" and self.compress == "none":
            raise FedtideError("--compress-down sends a quantised model, and a client's weights trained from it would "
                               "carry the quantisation back as if it were learning: add --compress int8 or int4, whose "
                               "updates the server reads against its full model")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise FedtideError(f"--device '{self.device}': use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class DriftSettings(Section):
    """Each client's drift detector, and how clients and server react to a detection."""

    drift_detector: str = setting("accuracy-or-inputs", "each client's drift detector: a River detector on its prequential "
                                  f"error stream ({', '.join(RIVER_DETECTORS)}), a test of the received model on each "
                                  "round's new data against the round before (accuracy-or-inputs, accuracy-drop; without "
                                  "labels: confidence-drop, input-shift), or none", choices=DRIFT_DETECTORS)
    drift_delta: float = setting(0.01, "ADWIN's confidence delta: larger reacts faster and raises more false alarms",
                                 minimum=0, above=True, maximum=1, below=True)
    drift_margin: float = setting(0.2, "accuracy-drop, accuracy-or-inputs and confidence-drop: the smallest fall "
                                  "since the last round that counts as drift (a client's extra epochs follow its "
                                  "drift while its accuracy is more than this below its level before)",
                                  minimum=0, above=True, maximum=1)
    drift_evidence: float = setting(0.1, "server: a drift report earns a reaction only when the reply's pre-training "
                                    "accuracy fell by this much since the node's last reply, or another node's did in "
                                    "the last 3 rounds, and the node has no more credited reports than the median "
                                    "node; 0: take the client's word",
                                    minimum=0, maximum=1)
    drift_follow_rounds: int = setting(3, "a detected drift keeps its same-round reactions for up to this many more "
                                       "rounds: the client's extra epochs (round-level detectors) while its "
                                       "pre-training accuracy is more than --drift-margin below its level before, the "
                                       "server's --drift-weight for a credited report until it is back at that level",
                                       minimum=0, maximum=100)
    react_server: bool = setting(False, "server reaction: after a round where --drift-quorum of clients report "
                                 "drift, sample every client and multiply local epochs by --drift-epoch-boost")
    drift_quorum: float = setting(0.3, "share of replies reporting drift that triggers the server reaction",
                                  minimum=0, above=True, maximum=1)
    drift_epoch_boost: int = setting(2, "local-epoch multiplier of the server reaction", minimum=1, maximum=100)
    react_lr_boost: float = setting(1.0, "client reaction: learning-rate multiplier for the round after a client "
                                    "detects drift", minimum=0, above=True)
    react_extra_epochs: int = setting(0, "client reaction: a client that detects drift in a round trains this many "
                                      "more epochs on that round's data before it replies (0: off)", minimum=0, maximum=10_000)
    drift_weight: float = setting(1.0, "server reaction: in the round a reply reports drift, its aggregation weight "
                                  "is multiplied by this (1: off)", minimum=0, above=True)

    def check(self) -> None:
        if self.reacts and self.drift_detector == "none":
            raise FedtideError("drift reactions need a detector: drop --drift-detector none")

    @property
    def reacts(self) -> bool:
        """Whether any reaction to detected drift is on (each needs a detector)."""
        return self.react_server or self.react_lr_boost != 1.0 or self.react_extra_epochs > 0 or self.drift_weight != 1.0

    @property
    def enlarges_updates(self) -> bool:
        """Whether a reaction makes a drifting client's honest update several times larger
        than its peers' (more epochs, a larger learning rate): the server's outlier rule
        would drop it (see ``server.influence``)."""
        return self.react_server or self.react_lr_boost > 1.0 or self.react_extra_epochs > 0


@dataclass(frozen=True)
class ServerSettings(Section):
    """The strategy: sampling, the server step, reply limits, the aggregation rule, waiting."""

    strategy: str = setting("fedavg", f"server strategy: {', '.join(STRATEGIES)}", choices=STRATEGIES)
    fraction_train: float = setting(1.0, "fraction of clients sampled for training each round",
                                    minimum=0, above=True, maximum=1)
    fraction_evaluate: float = setting(0.0, "fraction of clients asked to evaluate each round (0: server-side only)",
                                       minimum=0, maximum=1)
    server_lr: float = setting(0.0, "server learning rate for fedavgm/fedadam (0: their default, 1.0 / 0.01)",
                               minimum=0)
    server_momentum: float = setting(0.9, "server momentum for fedavgm", minimum=0)
    max_num_examples: int = setting(1_000_000, "largest num-examples a client reply may claim", minimum=1)
    round_timeout: float = setting(3600.0, "seconds a round waits for client replies; then it goes on with those "
                                   "that arrived (deployment: a client that crashed mid-round does not stall the run)",
                                   minimum=0, above=True)
    weight_cap: float = setting(2.0, "a reply's num-examples counts at most this many times the round's median "
                                "claim (0: no cap; see SECURITY.md)", minimum=0, maximum=1e6)
    norm_cap: float = setting(2.0, "cut each reply's update to this many times the round's median update norm "
                              "before aggregation (0: no cut; see SECURITY.md)", minimum=0, maximum=1e6)
    norm_outlier: float = setting(5.0, "drop a reply whose update norm is more than this many times the round's "
                                  "median update norm (0: never; see SECURITY.md)", minimum=0, maximum=1e6)
    max_update_norm: float = setting(0.0, "drop a reply whose update (reply - global weights) has an L2 norm above "
                                     "this (0: off)", minimum=0)
    max_reply_mb: float = setting(0.0, "drop a reply whose payload is larger than this many MiB (0: off)", minimum=0)
    exclude_after: int = setting(0, "stop sampling a node after this many of its replies were rejected (0: never)",
                                 minimum=0)
    aggregation: str = setting("fedavg", f"aggregation rule: {', '.join(AGGREGATIONS)} (robust rules withstand "
                               "faulty or hostile clients)", choices=AGGREGATIONS)
    trim_fraction: float = setting(0.1, "trimmed-mean: share of replies cut from each side per coordinate, in [0, 0.5)",
                                   minimum=0, maximum=0.5, below=True,
                                   hint="it is the share of replies cut from each side, so at least one must remain")
    tolerated_attackers: int = setting(1, "multikrum: attackers F to withstand; needs more than 2F+2 replies per round",
                                       minimum=0)
    clip_norm: float = setting(0.0, "clip: cut each update's L2 norm to this before the weighted average", minimum=0)
    min_clients: int = setting(0, "connected clients a round needs (0: all --clients); with fewer the round waits",
                               minimum=0)
    client_wait: float = setting(600.0, "seconds a round waits for --min-clients connected clients before the run "
                                 "stops with an error", minimum=0, above=True)
    buffer_size: int = setting(0, "asynchronous aggregation (FedBuff): update the global model every this many replies "
                               "and never wait for a slow client (0: synchronous rounds); simulated time (see "
                               "--speed-spread)", minimum=0, maximum=100_000)
    concurrency: int = setting(0, "--buffer-size: clients training at once (0: as many as a synchronous round samples)",
                               minimum=0, maximum=1_000_000)
    staleness_exponent: float = setting(0.5, "--buffer-size: a reply computed from a model s updates old counts "
                                        "1 / (1 + s) ** this", minimum=0, maximum=10)
    speed_spread: float = setting(1.0, "simulation: client speeds are log-normal, the slowest this many times slower "
                                  "than the fastest, and time is simulated (1: real time, unless --buffer-size)",
                                  minimum=1, maximum=1e6)
    max_clusters: int = setting(8, "--training clustered: most global models the server keeps", minimum=1, maximum=64)
    cluster_margin: float = setting(1.0, "--training clustered: a client whose best model's loss (nats) on its new data "
                                    "is this much above the round's median starts a model; two models whose losses "
                                    "on the same clients differ by less are merged", minimum=0, above=True, maximum=100)

    def check(self) -> None:
        for flag, cap in (("--weight-cap", self.weight_cap), ("--norm-cap", self.norm_cap),
                          ("--norm-outlier", self.norm_outlier)):
            if 0 < cap < 1:
                raise FedtideError(f"{flag} {cap:g} would cut the median reply itself: use 0 (off) or a value >= 1, "
                                   "e.g. 2")
        if self.aggregation == "clip" and self.clip_norm == 0:
            raise FedtideError("--aggregation clip needs --clip-norm > 0 (the largest update norm kept, e.g. 5)")
        if self.aggregation == "multikrum" and self.tolerated_attackers < 1:
            raise FedtideError("--aggregation multikrum needs --tolerated-attackers >= 1 (with 0 it is fedavg)")

    @property
    def timed(self) -> bool:
        """Whether a simulation runs in simulated time (``server.timed_rounds``)."""
        return self.buffer_size > 0 or self.speed_spread > 1

    @property
    def effective_server_lr(self) -> float:
        if self.server_lr:
            return self.server_lr
        return 0.01 if self.strategy == "fedadam" else 1.0


@dataclass(frozen=True)
class PrivacySettings(Section):
    """Differential privacy of what leaves a device (``server.privacy``)."""

    dp: str = setting("none", "differential privacy: none; client (DP-FedAvg: each client's update clipped to "
                      "--dp-clip, Gaussian noise on the sum); or sample (DP-SGD on each client: each sample's gradient "
                      "clipped to --dp-clip, noise on each step; replayed memories pay at every step); the budget "
                      "reported; needs pip install \"fedtide[dp]\"", choices=("none", "client", "sample"))
    dp_noise: float = setting(1.0, "--dp: noise multiplier z (noise std = z * --dp-clip on the sum)",
                              minimum=0.1, maximum=1e4)
    dp_clip: float = setting(1.0, "--dp: the largest L2 norm of a client's update (client) or of one sample's "
                             "gradient (sample)", minimum=0, above=True, maximum=1e6)
    dp_delta: float = setting(1e-5, "--dp: the delta of the (epsilon, delta) budget reported", minimum=0, above=True,
                              maximum=1, below=True)
    target_epsilon: float = setting(0.0, "--dp: stop the run before a round would spend more than this epsilon "
                                    "(sample: each client stops training before it would; 0: never)", minimum=0, maximum=1e6)
    dp_reproducible: bool = setting(False, "--dp: draw the noise from --seed (the same seed, the same numbers) instead "
                                    "of the operating system's entropy; for research only: whoever knows the seed can "
                                    "subtract the noise, so there is no privacy")
    secure_aggregation: bool = setting(False, "secure aggregation (SecAgg+): clients mask their updates so that the server "
                                       "learns only each round's sum; needs 3 or more clients a round and --aggregation "
                                       "fedavg (the influence bound and the robust rules read single updates: off)")
    secure_max_weight: float = setting(0.0, "--secure-aggregation: the most a client's num-examples counts (a larger "
                                       "claim is cut to it; the sum is most precise when this is near the clients' "
                                       "sample counts); 0: 4 x the median count of the round before (10,000 in the "
                                       "first)", minimum=0, maximum=1e6)


RELEASE_MODES = ("gate", "every-round", "manual")


@dataclass(frozen=True)
class ReleaseSettings(Section):
    """Which rounds' global models are released to the devices (``server.release_gate``)."""

    release: str = setting("gate", "which global models are released to devices: gate (those that pass the release "
                           "gate), every-round (each round's), manual (only `fedtide models release`)",
                           choices=RELEASE_MODES)
    gate_tolerance: float = setting(1.0, "release gate: points a candidate may lose against the best release (mean "
                                    "accuracy over the tasks seen) and against the released model on the current task",
                                    minimum=0, maximum=100)
    gate_max_forget: float = setting(10.0, "release gate: points a candidate may lose against the released model on "
                                     "any older task", minimum=0, maximum=100)
    keep_releases: int = setting(20, "released versions whose weights the run folder keeps (older ones keep their "
                                 "record; rolling back to them is refused)", minimum=1, maximum=100_000)
    export_releases: str = setting("none", "also write each released version for edge inference: torchscript or onnx "
                                   "(RUN_DIR/models/vNNNN.pt|.onnx, its accuracy before and after in the registry)",
                                   choices=("none", "torchscript", "onnx"))


@dataclass(frozen=True)
class FaultSettings(Section):
    """Fault injection, for simulations only: some clients send a faulty or hostile reply."""

    attack: str = setting("none", f"fault injection (simulation): what attacking clients send: "
                          f"{', '.join(ATTACKS[1:])}", choices=ATTACKS)
    attackers: int = setting(0, "fault injection: the first K partition ids attack", minimum=0)
    attacker_ids: str = setting("", "fault injection: these partition ids attack, comma-separated (e.g. 0,3)")
    attack_scale: float = setting(10.0, "scale, replace and backdoor attacks: update multiplier; lie-num-examples: how "
                                  "many times the real count is claimed", minimum=-1e6, maximum=1e6)
    attack_claim: int = setting(0, "fault injection: the attacking clients claim this num-examples (0: their own "
                                "count)", minimum=0)
    attack_noise_std: float = setting(1.0, "noise attack: std of the Gaussian noise added to every weight", minimum=0)
    attack_rounds: str = setting("", "fault injection: attack only in rounds FIRST-LAST (e.g. 12-14; default: every "
                                 "round)")

    def check(self) -> None:
        try:
            attackers = self.attacker_partitions
        except ValueError:
            raise FedtideError(
                f"--attacker-ids '{self.attacker_ids}' is not a comma-separated list of partition ids (e.g. 0,3)"
            ) from None
        if self.attackers and self.attacker_ids.strip():
            raise FedtideError("give either --attackers K or --attacker-ids, not both")
        if self.attack == "none" and attackers:
            raise FedtideError("--attackers/--attacker-ids name clients but --attack is none: choose an --attack")
        if self.attack != "none" and not attackers:
            raise FedtideError(f"--attack {self.attack} needs attacking clients: set --attackers K or --attacker-ids 0,3")
        if self.attack_rounds.strip():
            span = self.attack_round_span
            if span is None or not 1 <= span[0] <= span[1]:
                raise FedtideError(f"--attack-rounds '{self.attack_rounds[:40]}' is not FIRST-LAST with "
                                   "1 <= FIRST <= LAST (e.g. 12-14)")
        if self.attack == "lie-num-examples" and not self.attack_scale > 0:
            raise FedtideError(f"--attack-scale must be > 0 for lie-num-examples (got {self.attack_scale})")

    @property
    def attack_round_span(self) -> tuple[int, int] | None:
        """The rounds ``--attack-rounds`` names (None: every round, or a malformed value)."""
        first, dash, last = self.attack_rounds.strip().partition("-")
        if not dash or not first.strip().isdigit() or not last.strip().isdigit():
            return None
        return int(first), int(last)

    def attacks_in(self, server_round: int) -> bool:
        """Whether the attacking clients attack in ``server_round``."""
        span = self.attack_round_span
        return span is None or span[0] <= server_round <= span[1]

    @property
    def attacker_partitions(self) -> frozenset[int]:
        """Partition ids of the clients that attack."""
        if self.attacker_ids.strip():
            return frozenset(int(p) for p in self.attacker_ids.split(",") if p.strip())
        return frozenset(range(self.attackers))


@dataclass(frozen=True)
class RunSettings(Section):
    """The run itself: its seed, where it writes, what it shows."""

    seed: int = setting(0, "random seed; the same seed gives the same numbers", minimum=0)
    out: str = setting("", "run folder (default: runs/<time>-<scenario>-<method>-s<seed>)")
    quiet: bool = setting(False, "no progress bar or summary table")
    metrics_address: str = setting("", "serve Prometheus metrics of the live run at HOST:PORT, e.g. 127.0.0.1:9100 "
                                   '(needs pip install "fedtide[ops]"; default: none)')
    serve: str = setting("", "serve a live status page of the run at HOST:PORT (or PORT, on loopback), e.g. 8080; "
                         "open it in a browser")
    track: str = setting("", "log each round to tensorboard, mlflow or tensorboard,mlflow (needs pip install "
                         '"fedtide[track]"; TensorBoard in RUN_DIR/tensorboard, MLflow in RUN_DIR/mlflow.db)')
    track_uri: str = setting("", "--track mlflow: the tracking server or store to log to (default: RUN_DIR/mlflow.db)")

    def check(self) -> None:
        names = [n.strip() for n in self.track.split(",") if n.strip()]
        unknown = [n for n in names if n not in ("tensorboard", "mlflow")]
        if unknown:
            raise FedtideError(f"--track {unknown[0][:30]}: use tensorboard, mlflow or tensorboard,mlflow")
        if self.track_uri and "mlflow" not in names:
            raise FedtideError("--track-uri names MLflow's tracking store: add --track mlflow, or drop --track-uri")
