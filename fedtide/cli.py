"""``fedtide``: the command line. Parses flags into one RunConfig and calls a runtime."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from common.config import (
    DOMAIN_TRANSFORMS, METHODS, MODELS, OPTIMIZERS, SCENARIOS, STRATEGIES, RunConfig,
)
from common.errors import FedtideError
from fedtide.bench import REFERENCES
from fedtide.presets import PRESETS, preset_settings

ENGINES = ("inprocess", "flower")
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
    "model": f"model: {', '.join(MODELS)}",
    "init_from": "start from these weights (a .safetensors file, e.g. a run folder's model.safetensors)",
    "freeze": "comma-separated parameter-name prefixes clients do not train, e.g. features.1",
    "normalize": "standardize pixels with the training set's mean and std",
    "pad_to": "zero-pad images to this size, e.g. 32 (0: keep)",
    "hidden": "hidden layer widths, comma-separated",
    "method": f"continual-learning method(s): {', '.join(METHODS)}, combined with + (e.g. replay+ewc)",
    "memory_size": "replay memory per client, in samples (default 200; replay only)",
    "replay_ratio": "remembered samples mixed into each batch, per new sample",
    "replay_loss": "ce (plain experience replay) or ace (ER-ACE: new samples compete only among their own classes)",
    "ewc_lambda": "EWC penalty strength",
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


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtide", description="Federated continual learning on Flower.")
    commands = parser.add_subparsers(dest="command", required=True)
    simulate = commands.add_parser(
        "simulate",
        help="run a federation of simulated clients on this machine",
        description="Simulate a federation whose clients' data drifts task by task. With no flags: "
        "bundled 8x8 digits, 5 class-incremental tasks, 5 non-IID clients, replay.",
    )
    simulate.add_argument("--engine", choices=ENGINES, default="inprocess",
                          help="inprocess (fast, no Ray) or flower (Flower's simulation engine)")
    simulate.add_argument("--workers", type=int, default=1,
                          help="worker processes for the in-process engine (1: none, clients run in this process; "
                          "0: one per core); helps when each client's round is long")
    simulate.add_argument("--no-vectorize", action="store_true",
                          help="train each client separately even when a round's clients could share "
                          "one batched computation (plain SGD, no method hooks)")
    simulate.add_argument("--preset", metavar="NAME", help=f"start from a named scenario: {', '.join(PRESETS)}")
    _add_config_flags(simulate)

    download = commands.add_parser(
        "download", help="download mnist or fashion-mnist, verifying checksums",
        description="Fetch the four IDX files of a dataset into DIR/<name>, checking each against the "
        "sha256 of its original content; use DIR afterwards as --data-dir.",
    )
    download.add_argument("dataset", choices=("mnist", "fashion-mnist"))
    download.add_argument("--to", required=True, metavar="DIR", help="folder to download into")
    download.add_argument("--mirror", action="append", metavar="URL", help="base URL to fetch from instead of the defaults (repeatable)")

    bench = commands.add_parser(
        "bench",
        help="compare methods and references over seeds on one scenario",
        description="Run each method and the references local-only (no federation), fed-joint (all tasks "
        "at once, federated) and central-joint (all data pooled, one model) on the same splits; print one "
        "table and write it as CSV, Markdown and a plot. Re-running resumes an interrupted bench.",
    )
    bench.add_argument("--scenario", default="split-digits", help=f"scenario preset: {', '.join(PRESETS)}")
    bench.add_argument("--methods", default="naive,replay,ewc,lwf,replay+ewc", help="comma-separated methods")
    bench.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1)")
    bench.add_argument("--references", default=",".join(REFERENCES),
                       help=f"comma-separated references among {', '.join(REFERENCES)}, or none")
    bench.add_argument("--reference-method", default="replay", help="method the local-only reference trains with")
    bench.add_argument("--data-dir", help="folder with IDX files (default: $FEDTIDE_DATA_DIR)")
    bench.add_argument("--out", help="bench folder (default: bench/<scenario>)")
    bench.add_argument("--jobs", type=int, default=1, help="cells run at once, in separate processes")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting of every cell, e.g. --set rounds-per-task=5 (repeatable)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given: dict[str, Any] = preset_settings(args.preset) if args.preset else {}
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if getattr(args, f.name) is not None}
    if "memory_size" not in flags and "replay" not in flags.get("method", given.get("method", "replay")).split("+"):
        given.pop("memory_size", None)  # a preset's memory size only applies to a method with memory
    given.update(flags)
    if "data_dir" not in given and os.environ.get(DATA_DIR_ENV):
        given["data_dir"] = os.environ[DATA_DIR_ENV]
    config = RunConfig(**given)
    if not config.out:
        from server.run_folder import default_run_dir

        config = config.replace(out=str(default_run_dir(config)))
    return config


def _show_warnings() -> None:
    """Dropped replies and other server warnings appear above the progress bar, one line each."""
    from rich.console import Console
    from rich.logging import RichHandler

    logger = logging.getLogger("fedtide")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=Console(stderr=True), show_path=False, show_time=False))
        logger.setLevel(logging.INFO)
        logger.propagate = False


def bench_main(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fedtide.bench import COLUMNS, aggregate, build_cells, format_cell, run_bench, write_outputs

    if args.seeds < 1:
        raise FedtideError(f"--seeds must be at least 1 (got {args.seeds})")
    if args.jobs < 1:
        raise FedtideError(f"--jobs must be at least 1 (got {args.jobs})")
    settings = preset_settings(args.scenario)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedtideError(f"--set {item}: write KEY=VALUE, e.g. --set rounds-per-task=5")
        settings[key.replace("-", "_")] = value
    data_dir = args.data_dir or os.environ.get(DATA_DIR_ENV, "")
    if data_dir:
        settings["data_dir"] = data_dir
    base = RunConfig.from_mapping(settings)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    references = [] if args.references == "none" else [r.strip() for r in args.references.split(",") if r.strip()]
    for reference in references:
        if reference not in REFERENCES:
            raise FedtideError(f"unknown reference '{reference}': use {', '.join(REFERENCES)} or none")
    for method in methods + [args.reference_method]:
        base.replace(method=method, memory_size=None)  # validates the method name
    from common.scenarios import build_scenario

    build_scenario(base)  # data missing or settings impossible: say so before any run starts
    out = Path(args.out or Path("bench") / args.scenario)
    cells = build_cells(base, methods, args.seeds, references, args.reference_method, out)
    from server.run_folder import ensure_writable_folder

    ensure_writable_folder(out)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("", total=len(cells))

        def done(cell, reused):
            progress.update(task, advance=1, description=f"{cell.name}{' (already done)' if reused else ''}")

        records = run_bench(cells, args.jobs, done)
    rows = aggregate(records)
    title = f"fedtide bench: {args.scenario}, {args.seeds} seed(s)"
    write_outputs(out, records, rows, title)
    table = Table(title=title)
    table.add_column("method")
    for column in COLUMNS:
        table.add_column(column[0], justify="right")
    for row in rows:
        table.add_row(row["label"], *(format_cell(row[c[0]], c[3], row["seeds"]) for c in COLUMNS))
    Console(width=max(Console().width, 200)).print(table)
    console.print(f"written: {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'summary.png'}")


def download_main(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from common.download import download_dataset

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console) as progress:
        bars: dict[str, Any] = {}

        def report(name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = progress.add_task(name, total=total or None)
            progress.update(bars[name], completed=done)

        folder = download_dataset(args.dataset, Path(args.to), tuple(args.mirror) if args.mirror else None, report)
    console.print(f"{args.dataset} verified in {folder}; use --data-dir {args.to}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_warnings()
    try:
        if args.command == "bench":
            bench_main(args)
            return 0
        if args.command == "download":
            download_main(args)
            return 0
        config = config_from_args(args)
        from common.scenarios import build_scenario
        from server.run_folder import ensure_writable_folder

        build_scenario(config)  # missing data or impossible splits: fail before a folder is made
        ensure_writable_folder(Path(config.out))  # fail now, not after training
        if args.engine == "flower":
            from fedtide.flower_engine import run_flower_simulation

            run_flower_simulation(config)
        else:
            from fedtide.inprocess import default_workers, run_inprocess

            if args.workers < 0:
                raise FedtideError(f"--workers must be >= 0 (got {args.workers})")
            run_inprocess(config, workers=args.workers or default_workers(config), vectorize=not args.no_vectorize)
    except FedtideError as err:
        print(f"fedtide: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtide: interrupted; the run folder holds the rounds finished so far", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
