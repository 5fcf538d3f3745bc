"""The run settings as command-line flags: one flag per RunConfig field, shared by
``fedtide simulate`` and ``fedtide server`` (and presets, and $FEDTIDE_DATA_DIR)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from common.config import AGGREGATIONS, ATTACKS, DOMAIN_TRANSFORMS, METHODS, MODELS, OPTIMIZERS, SCENARIOS, STRATEGIES, RunConfig
from fedtide.presets import preset_settings

DATA_DIR_ENV = "FEDTIDE_DATA_DIR"

HELP = {
    "dataset": "digits (embedded, no download), mnist or fashion-mnist (IDX files in --data-dir)",
    "data_dir": "folder with the IDX files of mnist / fashion-mnist (default: $FEDTIDE_DATA_DIR)",
    "scenario": f"kind of drift: {', '.join(SCENARIOS)}",
    "num_tasks": "number of tasks in the sequence",
    "second_dataset": "dataset-switch: the dataset odd tasks come from",
    "domain_transform": f"input transform per task for domain-incremental: {', '.join(DOMAIN_TRANSFORMS)}",
    "clients": "number of clients",
    "client_samples": "training samples each client keeps (0: its whole share of the dataset)",
    "iid": "split data IID across clients (default: Dirichlet over labels, see --alpha)",
    "alpha": "Dirichlet concentration of the non-IID split (> 0; small = more skewed)",
    "rounds_per_task": "federated rounds on each task",
    "async_spread": "asynchronous drift: each client switches tasks up to this many rounds late (0: together)",
    "training": "federated; or a reference: local-only (no federation), joint (all tasks at once, no drift)",
    "strategy": f"server strategy: {', '.join(STRATEGIES)}",
    "fraction_train": "fraction of clients sampled for training each round",
    "fraction_evaluate": "fraction of clients asked to evaluate each round (0: server-side only)",
    "server_lr": "server learning rate for fedavgm/fedadam (default 1.0 / 0.01)",
    "server_momentum": "server momentum for fedavgm",
    "max_num_examples": "largest num-examples a client reply may claim",
    "round_timeout": "seconds a round waits for client replies; then it goes on with those that arrived "
    "(deployment: a client that crashed mid-round does not stall the run)",
    "min_clients": "connected clients a round needs (0: all --clients); with fewer the round waits",
    "client_wait": "seconds a round waits for --min-clients connected clients before the run stops with an error",
    "max_update_norm": "drop a reply whose update (reply - global weights) has an L2 norm above this (0: off)",
    "max_reply_mb": "drop a reply whose payload is larger than this many MiB (0: off)",
    "exclude_after": "stop sampling a node after this many of its replies were rejected (0: never)",
    "aggregation": f"aggregation rule: {', '.join(AGGREGATIONS)} (robust rules withstand faulty or hostile clients)",
    "trim_fraction": "trimmed-mean: share of replies cut from each side per coordinate, in [0, 0.5)",
    "tolerated_attackers": "multikrum: attackers F to withstand; needs more than 2F+2 replies per round",
    "clip_norm": "clip: cut each update's L2 norm to this before the weighted average",
    "attack": f"fault injection (simulation): what attacking clients send: {', '.join(ATTACKS[1:])}",
    "attackers": "fault injection: the first K partition ids attack",
    "attacker_ids": "fault injection: these partition ids attack, comma-separated (e.g. 0,3)",
    "attack_scale": "scale attack: update multiplier; lie-num-examples: how many times the real count is claimed",
    "attack_noise_std": "noise attack: std of the Gaussian noise added to every weight",
    "model": f"model: {', '.join(MODELS)}",
    "init_from": "start from these weights (a .safetensors file, e.g. a run folder's model.safetensors)",
    "freeze": "comma-separated parameter-name prefixes clients do not train, e.g. features.1",
    "normalize": "standardize pixels with the training set's mean and std",
    "pad_to": "zero-pad images to this size, e.g. 32 (0: keep)",
    "hidden": "hidden layer widths, comma-separated",
    "method": f"continual-learning method(s): {', '.join(METHODS)}, combined with + (e.g. replay+ewc)",
    "memory_size": "replay memory per client, in samples (default 200; replay and der only)",
    "replay_ratio": "remembered samples mixed into each batch, per new sample",
    "replay_loss": "ce (plain experience replay) or ace (ER-ACE: new samples compete only among their own classes)",
    "replay_shift": "move each replayed image by a fresh random offset of up to N pixels (0: off); images only",
    "ewc_lambda": "EWC penalty strength",
    "der_alpha": "der: weight of the squared error that keeps replayed logits near those stored at the end of their task",
    "lwf_alpha": "LwF distillation weight",
    "lwf_temperature": "LwF distillation temperature",
    "prox_mu": "FedProx proximal term on clients (0: off); works with any method",
    "drift_detector": "River detector on each client's prequential error stream: adwin, page-hinkley, ddm, none",
    "drift_delta": "ADWIN's confidence delta: larger reacts faster and raises more false alarms",
    "react_server": "server reaction: after a round where --drift-quorum of clients report drift, "
    "sample every client and multiply local epochs by --drift-epoch-boost",
    "drift_quorum": "share of replies reporting drift that triggers the server reaction",
    "drift_epoch_boost": "local-epoch multiplier of the server reaction",
    "react_lr_boost": "client reaction: learning-rate multiplier for the round after a client detects drift",
    "react_extra_epochs": "client reaction: a client that detects drift in a round trains this many more epochs "
    "on that round's data before it replies (0: off)",
    "drift_weight": "server reaction: in the round a reply reports drift, its aggregation weight is multiplied "
    "by this (1: off)",
    "optimizer": f"client optimizer: {', '.join(OPTIMIZERS)}",
    "local_epochs": "local epochs per round",
    "lr": "client learning rate",
    "lr_schedule": "constant; restart (cosine over each task, restarting at a switch); "
    "plateau (halve when the loss stalls, reset at a switch)",
    "batch_size": "client batch size",
    "seed": "random seed; the same seed gives the same numbers",
    "device": "auto (CUDA if available), cpu, cuda or cuda:N",
    "out": "run folder (default: runs/<time>-<scenario>-<method>-s<seed>)",
    "quiet": "no progress bar or summary table",
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        help_text = HELP.get(field.name, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        kind = str(field.type)
        parse = int if kind.startswith("int") else float if kind.startswith("float") else str
        shown = "" if default is None or default == "" else f" (default: {default})"
        parser.add_argument(flag, type=parse, default=None, metavar=field.name.upper(), help=help_text + shown)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given: dict[str, Any] = preset_settings(args.preset) if args.preset else {}
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if getattr(args, f.name) is not None}
    method_parts = flags.get("method", given.get("method", "replay")).split("+")
    if "memory_size" not in flags and not {"replay", "der"} & set(method_parts):
        given.pop("memory_size", None)  # a preset's memory size only applies to a method with memory
    given.update(flags)
    if "data_dir" not in given and os.environ.get(DATA_DIR_ENV):
        given["data_dir"] = os.environ[DATA_DIR_ENV]
    config = RunConfig(**given)
    if not config.out:
        from server.run_folder import default_run_dir

        config = config.replace(out=str(default_run_dir(config)))
    return config
