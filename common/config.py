"""One run configuration, built from CLI flags or a Flower ``run_config``.

Defaults live here and nowhere else. Keys travel over Flower as kebab-case strings
(``rounds-per-task``), the Python fields are snake_case (``rounds_per_task``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from common.errors import FedtideError

METHODS = ("naive", "replay", "der", "ewc", "lwf")
SCENARIOS = ("class-incremental", "domain-incremental", "concept-drift", "dataset-switch")
DOMAIN_TRANSFORMS = ("rotation", "permutation")
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam")
MODELS = ("mlp", "cnn")
DATASETS = ("digits", "mnist", "fashion-mnist")
OPTIMIZERS = ("sgd", "adam")
REPLAY_LOSSES = ("ce", "ace")
TRAINING_MODES = ("federated", "local-only", "joint")
LR_SCHEDULES = ("constant", "restart", "plateau")
DRIFT_DETECTORS = ("adwin", "page-hinkley", "ddm", "none")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "multikrum", "clip")
ATTACKS = ("none", "sign-flip", "scale", "noise", "nan", "inf", "wrong-shape", "lie-num-examples", "label-flip")
DEFAULT_MEMORY_SIZE = 200
NULLABLE = ("memory_size", "server_lr")
# sent with each round beside the settings: the model's shape, for edge clients that hold
# no copy of the dataset
INPUT_SHAPE_KEY, NUM_CLASSES_KEY = "input-shape", "num-classes"


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes. Same values, same seed: same numbers."""

    # data and scenario
    dataset: str = "digits"
    data_dir: str = ""  # folder with IDX files, for mnist / fashion-mnist
    normalize: bool = False  # standardize pixels with the training set's mean and std
    pad_to: int = 0  # zero-pad images to this size (e.g. 32); 0 keeps them as they are
    scenario: str = "class-incremental"
    second_dataset: str = "fashion-mnist"  # what a dataset-switch scenario switches to
    num_tasks: int = 5
    domain_transform: str = "rotation"
    clients: int = 5
    client_samples: int = 0  # training samples each client keeps (0: its whole share)
    iid: bool = False
    alpha: float = 1.0
    async_spread: int = 0  # rounds by which clients' task switches may lag (0: all switch together)
    training: str = "federated"  # or local-only / joint: references a method is compared with
    # federation
    rounds_per_task: int = 8
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    server_lr: float | None = None  # None: 1.0 for fedavgm, 0.01 for fedadam
    server_momentum: float = 0.9
    max_num_examples: int = 1_000_000
    round_timeout: float = 3600.0  # seconds a round waits for replies before going on with those in
    # robustness: reply limits and the aggregation rule (server side)
    max_update_norm: float = 0.0  # L2 norm of reply - global above which a reply is dropped (0: off)
    max_reply_mb: float = 0.0  # payload size above which a reply is dropped (0: off)
    exclude_after: int = 0  # a node with this many rejected replies is no longer sampled (0: never)
    aggregation: str = "fedavg"
    trim_fraction: float = 0.1  # trimmed-mean: share of replies cut from each side, per coordinate
    tolerated_attackers: int = 1  # multikrum: attackers F it must withstand (needs > 2F + 2 replies)
    clip_norm: float = 0.0  # clip: each update's L2 norm is cut to this before averaging
    # fault injection (simulation): some clients send a faulty or hostile reply
    attack: str = "none"
    attackers: int = 0  # the first K partition ids attack
    attacker_ids: str = ""  # or these partition ids, comma-separated
    attack_scale: float = 10.0  # scale: update multiplier; lie-num-examples: claimed multiple
    attack_noise_std: float = 1.0  # noise: std of the Gaussian added to every weight
    min_clients: int = 0  # connected clients a round needs (0: all --clients)
    client_wait: float = 600.0  # seconds to wait for --min-clients connected clients before giving up
    # local learning
    model: str = "mlp"
    hidden: str = "128,128"
    init_from: str = ""  # safetensors file with weights to start from (transfer learning)
    freeze: str = ""  # comma-separated parameter-name prefixes that clients do not train
    method: str = "replay"
    memory_size: int | None = None
    replay_ratio: float = 1.0
    replay_loss: str = "ce"
    replay_shift: int = 0  # replayed images move by a random offset of up to this many pixels (0: off)
    der_alpha: float = 0.2  # der: weight of the squared error between replayed and stored logits
    ewc_lambda: float = 50.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    prox_mu: float = 0.0
    drift_detector: str = "adwin"
    drift_delta: float = 0.01
    react_server: bool = False  # after a drift quorum: all clients, more local epochs next round
    drift_quorum: float = 0.3
    drift_epoch_boost: int = 2
    react_lr_boost: float = 1.0  # a client's lr is multiplied by this in the round after it detects drift
    react_extra_epochs: int = 0  # a client that detects drift trains this many more epochs in the same round
    drift_weight: float = 1.0  # aggregation weight multiplier, in the same round, for replies reporting drift
    optimizer: str = "sgd"
    local_epochs: int = 5
    lr: float = 0.1
    lr_schedule: str = "constant"
    batch_size: int = 16
    # run
    seed: int = 0
    device: str = "auto"
    out: str = ""
    quiet: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived values -------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        """The composable method parts, e.g. ``replay+ewc`` -> ("replay", "ewc")."""
        return tuple(part for part in self.method.split("+") if part != "naive")

    @property
    def keeps_memory(self) -> bool:
        """Whether the method keeps a replay memory (replay, or der, which is replay with logits)."""
        return any(part in ("replay", "der") for part in self.methods)

    @property
    def effective_memory_size(self) -> int:
        return DEFAULT_MEMORY_SIZE if self.memory_size is None else self.memory_size

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.freeze.split(",") if p.strip())

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return tuple(int(w) for w in self.hidden.split(",") if w.strip())

    @property
    def effective_server_lr(self) -> float:
        if self.server_lr is not None:
            return self.server_lr
        return 0.01 if self.strategy == "fedadam" else 1.0

    @property
    def reacts_to_drift(self) -> bool:
        """Whether any reaction to detected drift is on (each needs a detector)."""
        return (self.react_server or self.react_lr_boost != 1.0 or self.react_extra_epochs > 0
                or self.drift_weight != 1.0)

    @property
    def effective_min_clients(self) -> int:
        return self.min_clients or self.clients

    @property
    def num_rounds(self) -> int:
        return self.num_tasks * self.rounds_per_task + self.async_spread

    @property
    def attacker_partitions(self) -> frozenset[int]:
        """Partition ids of the clients that attack (simulation fault injection)."""
        if self.attacker_ids.strip():
            return frozenset(int(p) for p in self.attacker_ids.split(",") if p.strip())
        return frozenset(range(self.attackers))

    @property
    def max_replies_per_round(self) -> int:
        """The most training replies a round can bring: the nodes sampled (all of them
        after a drift quorum when the server reacts)."""
        return self.clients if self.react_server else max(int(self.clients * self.fraction_train), 1)

    # ---- validation -----------------------------------------------------
    def validate(self) -> None:
        """Raise FedtideError naming the field and what to change."""
        _one_of("dataset", self.dataset, DATASETS)
        _one_of("scenario", self.scenario, SCENARIOS)
        _one_of("second-dataset", self.second_dataset, DATASETS)
        _one_of("domain-transform", self.domain_transform, DOMAIN_TRANSFORMS)
        _one_of("strategy", self.strategy, STRATEGIES)
        _one_of("model", self.model, MODELS)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("drift-detector", self.drift_detector, DRIFT_DETECTORS)
        _one_of("replay-loss", self.replay_loss, REPLAY_LOSSES)
        _one_of("training", self.training, TRAINING_MODES)
        _one_of("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        if isinstance(self.async_spread, bool) or not isinstance(self.async_spread, int) or self.async_spread < 0:
            raise FedtideError(f"--async-spread must be a whole number of rounds >= 0 (got {self.async_spread})")
        parts = self.method.split("+")
        for part in parts:
            if part not in METHODS:
                raise FedtideError(
                    f"unknown method '{part}' in --method {self.method}: use one of "
                    f"{', '.join(METHODS)}, or combine them with '+' (e.g. replay+ewc)"
                )
        if "naive" in parts and len(parts) > 1:
            raise FedtideError(
                f"--method {self.method}: 'naive' means no continual-learning method "
                "and cannot be combined; drop it"
            )
        if "replay" in parts and "der" in parts:
            raise FedtideError(
                f"--method {self.method}: der is replay that also keeps logits, so it cannot be "
                "combined with replay; use der alone (e.g. der+lwf)"
            )
        if isinstance(self.replay_shift, bool) or not isinstance(self.replay_shift, int) or self.replay_shift < 0:
            raise FedtideError(f"--replay-shift must be a whole number of pixels >= 0 (got {self.replay_shift})")
        if self.replay_shift and not self.keeps_memory:
            raise FedtideError(
                f"--replay-shift moves replayed memories but --method {self.method} keeps none: "
                "drop --replay-shift or use replay or der"
            )
        if self.replay_shift and self.scenario == "domain-incremental" and self.domain_transform == "permutation":
            raise FedtideError(
                "--replay-shift moves pixels to their neighbours' places, which means nothing once the "
                "pixels are permuted: drop --replay-shift for permuted tasks"
            )
        if self.memory_size is not None and not self.keeps_memory:
            raise FedtideError(
                f"--memory-size is set but --method {self.method} keeps no memory: "
                "drop --memory-size or add a memory (e.g. --method replay or der)"
            )
        _positive_int("num-tasks", self.num_tasks)
        _positive_int("clients", self.clients)
        _positive_int("rounds-per-task", self.rounds_per_task)
        _positive_int("local-epochs", self.local_epochs)
        _positive_int("batch-size", self.batch_size)
        _positive_int("max-num-examples", self.max_num_examples)
        if self.memory_size is not None:
            _positive_int("memory-size", self.memory_size)
        if isinstance(self.client_samples, bool) or self.client_samples < 0:
            raise FedtideError(f"--client-samples must be >= 0 (got {self.client_samples})")
        if self.pad_to < 0:
            raise FedtideError(f"--pad-to must be >= 0 (got {self.pad_to})")
        if not self.alpha > 0:
            raise FedtideError(
                f"--alpha must be > 0 (got {self.alpha}): small values (0.1) give very "
                "non-IID clients, large ones (100) nearly IID; use --iid for an IID split"
            )
        if isinstance(self.min_clients, bool) or not 0 <= self.min_clients <= self.clients:
            raise FedtideError(f"--min-clients must be between 0 (all) and --clients {self.clients} (got {self.min_clients})")
        if not self.client_wait > 0:
            raise FedtideError(f"--client-wait must be > 0 seconds (got {self.client_wait})")
        if not self.round_timeout > 0:
            raise FedtideError(f"--round-timeout must be > 0 seconds (got {self.round_timeout})")
        if not self.lr > 0:
            raise FedtideError(f"--lr must be > 0 (got {self.lr})")
        if self.server_lr is not None and not self.server_lr > 0:
            raise FedtideError(f"--server-lr must be > 0 (got {self.server_lr})")
        if self.strategy == "fedprox" and self.prox_mu == 0:
            raise FedtideError("--strategy fedprox needs a proximal term: set --prox-mu (e.g. 0.01)")
        for name in ("prox_mu", "ewc_lambda", "lwf_alpha", "der_alpha", "server_momentum"):
            if getattr(self, name) < 0:
                raise FedtideError(f"--{_flag(name)} must be >= 0 (got {getattr(self, name)})")
        if not 0 < self.drift_delta < 1:
            raise FedtideError(f"--drift-delta must be between 0 and 1 (got {self.drift_delta})")
        if not self.replay_ratio > 0:
            raise FedtideError(f"--replay-ratio must be > 0 (got {self.replay_ratio})")
        if not 0 < self.drift_quorum <= 1:
            raise FedtideError(f"--drift-quorum must be in (0, 1] (got {self.drift_quorum})")
        _positive_int("drift-epoch-boost", self.drift_epoch_boost)
        if not self.react_lr_boost > 0:
            raise FedtideError(f"--react-lr-boost must be > 0 (got {self.react_lr_boost})")
        if self.react_extra_epochs < 0:
            raise FedtideError(f"--react-extra-epochs must be >= 0 (got {self.react_extra_epochs})")
        if not (self.drift_weight > 0 and math.isfinite(self.drift_weight)):
            raise FedtideError(f"--drift-weight must be a finite number > 0 (got {self.drift_weight})")
        if self.drift_weight != 1.0 and self.aggregation in ("median", "trimmed-mean"):
            raise FedtideError(
                f"--aggregation {self.aggregation} ignores reply weights, so --drift-weight would do nothing: "
                "use fedavg, multikrum or clip, or drop --drift-weight"
            )
        if self.drift_weight != 1.0 and self.training == "local-only":
            raise FedtideError("--training local-only aggregates nothing, so --drift-weight would do nothing: drop it")
        if self.reacts_to_drift and self.drift_detector == "none":
            raise FedtideError("drift reactions need a detector: drop --drift-detector none")
        if not self.lwf_temperature > 0:
            raise FedtideError(f"--lwf-temperature must be > 0 (got {self.lwf_temperature})")
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise FedtideError(f"--{_flag(name)} must be between 0 and 1 (got {value})")
        if self.fraction_train == 0:
            raise FedtideError("--fraction-train must be > 0: no client would train")
        self._validate_robustness()
        try:
            widths = self.hidden_widths
        except ValueError:
            widths = ()
        if not widths or min(widths) <= 0:
            raise FedtideError(
                f"--hidden '{self.hidden}' is not a list of positive layer widths: use e.g. 256,128"
            )
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise FedtideError(f"--device '{self.device}': use auto, cpu, cuda or cuda:N")

    def _validate_robustness(self) -> None:
        _one_of("aggregation", self.aggregation, AGGREGATIONS)
        _one_of("attack", self.attack, ATTACKS)
        for name in ("max_update_norm", "max_reply_mb", "clip_norm", "attack_noise_std"):
            if not getattr(self, name) >= 0:
                raise FedtideError(f"--{_flag(name)} must be >= 0 (got {getattr(self, name)})")
        for name in ("exclude_after", "tolerated_attackers", "attackers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FedtideError(f"--{_flag(name)} must be a whole number >= 0 (got {value})")
        if not 0 <= self.trim_fraction < 0.5:
            raise FedtideError(
                f"--trim-fraction must be in [0, 0.5) (got {self.trim_fraction}): it is the share of "
                "replies cut from each side, so at least one must remain"
            )
        replies = self.max_replies_per_round
        if self.aggregation == "clip" and self.clip_norm == 0:
            raise FedtideError("--aggregation clip needs --clip-norm > 0 (the largest update norm kept, e.g. 5)")
        if self.aggregation == "multikrum":
            f = self.tolerated_attackers
            if f < 1:
                raise FedtideError("--aggregation multikrum needs --tolerated-attackers >= 1 (with 0 it is fedavg)")
            if replies <= 2 * f + 2:
                raise FedtideError(
                    f"--aggregation multikrum with --tolerated-attackers {f} needs more than {2 * f + 2} replies "
                    f"per round, but at most {replies} arrive: use --clients {2 * f + 3} or more "
                    f"(and --fraction-train 1), or lower --tolerated-attackers"
                )
        if self.aggregation == "trimmed-mean":
            cut = trimmed_count(replies, self.trim_fraction)
            if replies - 2 * cut < 1:
                raise FedtideError(
                    f"--aggregation trimmed-mean cuts {cut} of {replies} replies from each side and keeps none: "
                    "use more --clients or a smaller --trim-fraction"
                )
        try:
            attackers = self.attacker_partitions
        except ValueError:
            raise FedtideError(
                f"--attacker-ids '{self.attacker_ids}' is not a comma-separated list of partition ids (e.g. 0,3)"
            ) from None
        if self.attackers and self.attacker_ids.strip():
            raise FedtideError("give either --attackers K or --attacker-ids, not both")
        if any(not 0 <= p < self.clients for p in attackers):
            raise FedtideError(
                f"attacking clients {sorted(attackers)} must be partition ids 0..{self.clients - 1} (--clients {self.clients})"
            )
        if self.attack == "none" and attackers:
            raise FedtideError("--attackers/--attacker-ids name clients but --attack is none: choose an --attack")
        if self.attack != "none" and not attackers:
            raise FedtideError(f"--attack {self.attack} needs attacking clients: set --attackers K or --attacker-ids 0,3")
        if self.attack == "lie-num-examples" and not self.attack_scale > 0:
            raise FedtideError(f"--attack-scale must be > 0 for lie-num-examples (got {self.attack_scale})")
        if self.attack == "scale" and not math.isfinite(self.attack_scale):
            raise FedtideError(f"--attack-scale must be a finite number (got {self.attack_scale})")

    # ---- conversion -----------------------------------------------------
    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case keys; ``memory-size`` omitted when unset (Flower has no None)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[_flag(f.name)] = value
        return out

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], ignore_unknown: bool = False) -> "RunConfig":
        """Build from kebab- or snake-case keys; unknown keys are an error unless
        ``ignore_unknown`` (a strategy may add its own keys, e.g. ``proximal-mu``)."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            name = key.replace("-", "_")
            if name in NULLABLE and value in (0, 0.0, ""):
                continue  # TOML has no null: 0 in a Flower run_config means "use the default"
            if name not in known:
                if ignore_unknown:
                    continue
                raise FedtideError(
                    f"unknown setting '{key}': valid settings are "
                    f"{', '.join(sorted(_flag(n) for n in known))}"
                )
            kwargs[name] = _coerce(name, value, known[name])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def trimmed_count(replies: int, trim_fraction: float) -> int:
    """Replies a trimmed mean cuts from each side: ceil(fraction * replies), at least one
    whenever the fraction is > 0 (so that trimming never silently turns into a plain mean)."""
    if trim_fraction <= 0:
        return 0
    return max(1, math.ceil(trim_fraction * replies - 1e-9))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FedtideError(f"unknown {name} '{value}': use one of {', '.join(allowed)}")


def _positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FedtideError(f"--{name} must be a positive integer (got {value})")


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    """Flower's run_config turns TOML values into int/float/str/bool; map them back."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise FedtideError(f"setting '{_flag(name)}' got {value!r}, expected {kind}") from None
