"""``fedtide``: the command line. Parses flags into one RunConfig and calls a runtime."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from common.config import RunConfig
from common.method_registry import registered
from common.errors import FedtideError
from fedtide import export_command, models_command, predict_command
from fedtide.deployment import certs, client_process, data_files, nodes, server_process
from fedtide.bench import REFERENCES
from fedtide.presets import PRESETS, preset_settings
from fedtide.run_flags import DATA_DIR_ENV, add_config_flags, config_from_args

MAX_THREADS = 1024
ENGINES = ("inprocess", "flower")
# each module adds its subcommand (add_parser) and carries it out (run)
DEPLOYMENT_COMMANDS = {
    "certs": certs, "nodes": nodes, "server": server_process, "client": client_process, "split-files": data_files,
    "export": export_command, "models": models_command, "predict": predict_command,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` (the subcommand about to run), the other subcommands get
    no method flags (those import every method, and so torch)."""
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
    simulate.add_argument("--ray-address", metavar="HOST:PORT",
                          help="--engine flower: join this running Ray cluster (its head's address, as `ray start "
                          "--head` printed it) instead of starting Ray here; every node needs the same Python, Ray, "
                          "fedtide and data paths")
    simulate.add_argument("--client-cpus", type=float, default=None,
                          help="--engine flower: CPUs Ray reserves for each client (default 1; 0.5 runs two per core)")
    simulate.add_argument("--client-gpus", type=float, default=None,
                          help="--engine flower: GPUs Ray reserves for each client (default 0; 0.25 shares a GPU by "
                          "four)")
    simulate.add_argument("--workers", type=int, default=None,
                          help="worker processes for the in-process engine (1, the default: none, clients run in this "
                          "process; 0: one per core); helps when each client's round is long. --resume takes the "
                          "run's own count")
    simulate.add_argument("--threads", type=int, default=None,
                          help="torch's threads in this process and in each worker (default: torch's choice here, "
                          "the cores divided among --workers); 1 keeps a run steady beside other busy processes")
    simulate.add_argument("--no-vectorize", action="store_true",
                          help="train each client separately even when a round's clients could share "
                          "one batched computation (every method but si and dgr, without DP-SGD or Adam)")
    simulate.add_argument("--preset", metavar="NAME", help=f"start from a named scenario: {', '.join(PRESETS)}")
    simulate.add_argument("--resume", metavar="RUN_DIR",
                          help="go on with the run in RUN_DIR after its last checkpoint, with its own settings "
                          "(config.json); flags that would change what it computes are refused")
    simulate.add_argument("--force", action="store_true",
                          help="let --out name a folder that holds a run: that run's files are deleted first")
    add_config_flags(simulate, methods=command in (None, "simulate"))

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
    bench.add_argument("--trainings", default="federated",
                       help="comma-separated ways to train each method: federated, clustered, and the references "
                            "cluster-oracle and personal-head (e.g. for --scenario distributed-drift-mnist)")
    bench.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1)")
    bench.add_argument("--references", default=",".join(REFERENCES),
                       help=f"comma-separated references among {', '.join(REFERENCES)}, or none")
    bench.add_argument("--reference-method", default="replay", help="method the local-only reference trains with")
    bench.add_argument("--data-dir", help="folder with IDX files (default: $FEDTIDE_DATA_DIR)")
    bench.add_argument("--out", help="bench folder (default: bench/<scenario>)")
    bench.add_argument("--jobs", type=int, default=1, help="cells run at once, in separate processes")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch's threads per cell (default: the cores divided among --jobs)")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting of every cell, e.g. --set rounds-per-task=5 (repeatable)")
    for name, module in DEPLOYMENT_COMMANDS.items():
        module.add_parser(commands, methods=command in (None, name))
    return parser


def _command(argv: Sequence[str] | None) -> str:
    """The subcommand in ``argv`` (the first word that is not an option), or "" for none."""
    words = list(sys.argv[1:] if argv is None else argv)
    return next((w for w in words if not w.startswith("-")), "")


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

    from fedtide.bench import (
        COLUMNS, TRAININGS, aggregate, build_cells, format_cell, reference_gaps, run_bench, with_method, write_outputs,
    )

    if args.seeds < 1:
        raise FedtideError(f"--seeds must be at least 1 (got {args.seeds})")
    if args.jobs < 1:
        raise FedtideError(f"--jobs must be at least 1 (got {args.jobs})")
    check_threads(args.threads)
    settings = preset_settings(args.scenario)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedtideError(f"--set {item}: write KEY=VALUE, e.g. --set rounds-per-task=5")
        settings[key.replace("-", "_")] = value
    data_dir = args.data_dir or os.environ.get(DATA_DIR_ENV, "")
    if data_dir:
        settings["data_dir"] = data_dir
    # settings of methods named in --methods go to the cells that use them; those of methods that
    # their settings turn on (prox-mu) stay with every cell
    by_name = {"-".join(key.split("_")): key for key in settings}
    chosen = {s.name for cls in registered().values() if cls.selectable for s in cls.settings}
    options = {name: settings.pop(key) for name, key in by_name.items() if name in chosen}
    base = RunConfig.from_mapping({**settings, "method": "naive"})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    references = [] if args.references == "none" else [r.strip() for r in args.references.split(",") if r.strip()]
    for reference in references:
        if reference not in REFERENCES:
            raise FedtideError(f"unknown reference '{reference}': use {', '.join(REFERENCES)} or none")
    trainings = [t.strip() for t in args.trainings.split(",") if t.strip()]
    for training in trainings:
        if training not in TRAININGS:
            raise FedtideError(f"unknown training '{training}' in --trainings: use {', '.join(TRAININGS)}")
        base.replace(training=training)  # validates it with the scenario (cluster-oracle needs distributed-drift)
    for method in methods + [args.reference_method]:
        with_method(base, method, options)  # validates the method name and its settings
    from common.scenarios import build_scenario

    build_scenario(base.data, base.seed)  # data missing or settings impossible: say so before any run starts
    out = Path(args.out or Path("bench") / args.scenario)
    cells = build_cells(base, methods, args.seeds, references, args.reference_method, out, options, trainings)
    from common.files import ensure_writable_folder

    ensure_writable_folder(out, "the bench folder")
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("", total=len(cells))

        def done(cell, reused):
            progress.update(task, advance=1, description=f"{cell.name}{' (already done)' if reused else ''}")

        records = run_bench(cells, args.jobs, done, args.threads)
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
    for line in reference_gaps(rows):
        console.print(line)
    console.print(f"written: {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'summary.svg'}")


def download_main(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from common.download import download_dataset
    from common.files import ensure_writable_folder

    ensure_writable_folder(Path(args.to) / args.dataset, "the download folder", "--to")  # before the progress bars
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console) as progress:
        bars: dict[str, Any] = {}

        def report(name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = progress.add_task(name, total=total or None)
            progress.update(bars[name], completed=done)

        folder = download_dataset(args.dataset, Path(args.to), tuple(args.mirror) if args.mirror else None, report)
    console.print(f"{args.dataset} verified in {folder}; use --data-dir {args.to}")


def simulate_main(args: argparse.Namespace) -> None:
    """``fedtide simulate``, new or ``--resume RUN_DIR`` (which returns at once when that run
    already finished). The run folder is locked from its first check to the run's end."""
    if args.workers is not None and args.workers < 0:
        raise FedtideError(f"--workers must be >= 0 (got {args.workers})")
    check_threads(args.threads)
    ray_cluster(args)  # bad Ray flags: refused before anything starts
    from fedtide.resume import finished_message, resume_config

    if args.resume:
        if args.force:
            raise FedtideError("--force replaces a run and --resume goes on with it: drop one of them")
        config = resume_config(args)
        if config is None:
            print(finished_message(args.resume), file=sys.stderr)
            return
        if args.engine == "flower":
            raise FedtideError(
                "--resume runs on the in-process engine only: Flower's engine keeps the clients' state "
                "where a checkpoint cannot reach it"
            )
    else:
        config = config_from_args(args)
    from common.files import ensure_writable_folder
    from common.scenarios import build_scenario
    from server.run_folder import prepare_new_run
    from server.run_lock import hold_run_folder

    build_scenario(config.data, config.seed)  # missing data or impossible splits: fail before a folder is made
    folder = ensure_writable_folder(Path(config.run.out))  # fail now, not after training
    with hold_run_folder(folder):
        if args.resume and resume_config(args) is None:  # finished by the process that held the lock till now
            print(finished_message(args.resume), file=sys.stderr)
            return
        if not args.resume:
            prepare_new_run(folder, replace=args.force)
        _simulate(args, config)


def _simulate(args: argparse.Namespace, config: RunConfig) -> None:
    if args.engine == "flower":
        from fedtide.runtimes.flower_engine import run_flower_simulation

        run_flower_simulation(config, cluster=ray_cluster(args))
        return
    from fedtide.runtimes.inprocess import default_workers, run_inprocess

    workers, vectorize = args.workers, not args.no_vectorize
    if args.resume:  # go on the way the run started, unless a flag says otherwise (then it is checked)
        from fedtide.resume import recorded_runtime

        started = recorded_runtime(Path(config.run.out))
        workers = started.get("workers") if workers is None else workers
        vectorize = vectorize and started.get("vectorize") is not False
    workers = 1 if workers is None else workers
    run_inprocess(config, workers=workers or default_workers(config), vectorize=vectorize, resume=bool(args.resume),
                  threads=args.threads)


def ray_cluster(args: argparse.Namespace):
    """Where ``--engine flower`` runs Ray (``--ray-address``, ``--client-cpus``, ``--client-gpus``);
    those flags are refused with the in-process engine, where they would do nothing."""
    given = [flag for flag, value in (("--ray-address", args.ray_address), ("--client-cpus", args.client_cpus),
                                      ("--client-gpus", args.client_gpus)) if value is not None]
    if args.engine != "flower":
        if given:
            raise FedtideError(f"{', '.join(given)} only apply to Flower's engine (Ray): add --engine flower, or drop "
                               "them")
        return None
    from fedtide.runtimes.flower_engine import RayCluster

    return RayCluster(args.ray_address, 1.0 if args.client_cpus is None else args.client_cpus,
                      0.0 if args.client_gpus is None else args.client_gpus)


def check_threads(threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise FedtideError(f"--threads must be between 1 and {MAX_THREADS} (got {threads}); leave it out for the default")


def _interrupt(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(_command(argv)).parse_args(argv)
    _show_warnings()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, kill: clean up as for Ctrl-C
    try:
        if args.command == "bench":
            bench_main(args)
            return 0
        if args.command == "download":
            download_main(args)
            return 0
        if args.command in DEPLOYMENT_COMMANDS:
            return DEPLOYMENT_COMMANDS[args.command].run(args) or 0
        simulate_main(args)
    except FedtideError as err:
        print(f"fedtide: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtide: interrupted; the run folder holds the rounds finished so far", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The ``fedtide`` command: ``main``, then a quick exit.

    Once everything is written, tearing the interpreter down (freeing every module of
    torch, numpy and Flower one object at a time) takes over half a second, a tenth of a
    short simulation. The exit handlers still run (logging's among them) and the output is
    flushed. The exit goes the normal way when another thread is still alive and under a
    profiler or tracer (they write their results after the program returns)."""
    code = main()
    if threading.active_count() > 1 or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
