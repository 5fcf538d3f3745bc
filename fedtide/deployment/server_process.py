"""``fedtide server``: a Flower SuperLink with TLS and node authentication, and the fedtide
run on it, from one command.

The SuperLink runs as a child process (its log in ``RUN_DIR/superlink.log``); the nodes'
public keys found in the certificate folder are registered with it, and kept in step with
the folder while the run goes on (``fedtide.deployment.membership``); the run is submitted
as a Flower App whose run config is the server's settings, so the ServerApp that runs is
the very one of ``fedtide simulate`` and writes the same run folder. This process follows
that folder to show a progress bar, prints the summary table, and stops the SuperLink.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

import fedtide
from common.config import RunConfig
from common.errors import FedtideError
from fedtide.deployment.cert_files import CertificateSet
from fedtide.deployment.membership import FleetMembership
from fedtide.runtimes.flower_processes import (
    Descendants, FlowerProcess, flower_env, flower_executable, flwr_cli, parse_address, write_connection,
)
from fedtide.run_flags import add_config_flags, config_from_args

DEFAULT_ADDRESS = "0.0.0.0:9092"
STATUS_POLL_SECONDS = 30.0  # each look costs a `flwr ls` process (~100 MB, ~1 s of CPU); a normal end is seen sooner, by its summary.json


def add_parser(commands: Any, methods: bool = True) -> None:
    parser = commands.add_parser(
        "server",
        help="start a server process: Flower SuperLink (TLS, node authentication) and the fedtide run",
        description="Start a Flower SuperLink with TLS and node authentication, register the node public "
        "keys of --certs, run the fedtide ServerApp for the configured rounds with the clients that connect "
        "(`fedtide client`), write the run folder and stop. Takes every run setting of `fedtide simulate`; "
        "--clients defaults to the number of node keys.",
    )
    parser.add_argument("--certs", metavar="DIR", help="folder made by `fedtide certs`")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no node authentication: anyone who reaches the port can join (testing only)")
    parser.add_argument("--database", required=True, metavar="FILE",
                        help="SQLite file where the SuperLink keeps its state (nodes, runs, messages)")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                        help=f"where clients reach the server (default: {DEFAULT_ADDRESS})")
    parser.add_argument("--start-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long the SuperLink may take to start (default: 60)")
    parser.add_argument("--preset", metavar="NAME", help="start from a named scenario (see `fedtide simulate --help`)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="go on with the run in RUN_DIR after its last checkpoint, with its own settings "
                        "(config.json); restart the clients with their --state folders")
    parser.add_argument("--force", action="store_true",
                        help="let --out replace a run already there (its files are deleted)")
    add_config_flags(parser, methods=methods)


def run(args: argparse.Namespace) -> None:
    console = Console(stderr=True)
    parse_address(args.address, "--address")
    certs = _certificates(args)
    if args.clients is None and not args.resume:  # before the settings are checked against it
        if certs is None:
            raise FedtideError("--insecure has no node keys to count: say how many clients to wait for with --clients N")
        args.clients = len(certs.node_public_keys())
    _stop_leftovers(Path(args.resume) if args.resume else Path(args.out) if args.out else None)
    if args.resume and args.force:
        raise FedtideError("--force replaces a run and --resume goes on with it: drop one of them")
    if args.resume:
        from fedtide.resume import finished_message, resume_config

        config = resume_config(args)
        if config is None:
            console.print(finished_message(args.resume))
            return
        config = config.replace(quiet=bool(args.quiet))  # the stored config is the ServerApp's (always quiet)
    else:
        config = config_from_args(args)
    if config.server.fraction_evaluate > 0:
        raise FedtideError(
            "--fraction-evaluate must stay 0 with `fedtide server`: edge clients hold no test set; "
            "the server evaluates the global model on the dataset's test split every round"
        )
    if config.data.training not in ("federated", "clustered"):
        raise FedtideError(f"--training {config.data.training} is a simulation reference: use `fedtide simulate`")
    if config.server.speed_spread > 1:
        raise FedtideError("--speed-spread simulates client speeds in `fedtide simulate`; real clients take real time: drop it")
    if config.faults.attack != "none":
        raise FedtideError(f"--attack {config.faults.attack} is fault injection for simulations: use `fedtide simulate`")
    from common.scenarios import build_scenario
    from common.files import ensure_writable_folder

    build_scenario(config.data, config.seed)  # the server's test data must be readable before anything starts
    out = ensure_writable_folder(Path(config.run.out)).resolve()
    if not args.resume:
        from server.run_folder import prepare_new_run
        from server.run_lock import hold_run_folder

        with hold_run_folder(out):  # refused while another run uses the folder
            prepare_new_run(out, replace=args.force)
    config = config.replace(out=str(out))
    database = Path(args.database).expanduser().resolve()
    ensure_writable_folder(database.parent, "the database folder", "--database")
    if certs is None:
        console.print("[bold red]warning:[/] --insecure: no TLS, no node authentication; "
                      "anyone who reaches the port can join this federation and read its model")
    serve(config, certs, database, args.address, args.start_timeout, console, resume=bool(args.resume))


PROCESS_RECORD = "flower-processes.json"  # in the run folder: what the running SuperLink started


def _stop_leftovers(folder: Path | None) -> None:
    """Stop the ServerApp and SuperExec a killed earlier `fedtide server` left running for
    ``folder`` (an orphaned ServerApp holds the run lock, so that --resume could never start)."""
    if folder is not None and (record := folder.expanduser() / PROCESS_RECORD).is_file():
        if leftovers := Descendants.stop_leftovers(record):
            print(f"fedtide server: stopped {leftovers} process(es) a killed earlier server left running",
                  file=sys.stderr)


def _certificates(args: argparse.Namespace) -> CertificateSet | None:
    if args.insecure:
        return None
    if not args.certs:
        raise FedtideError(
            "--certs DIR is required: make it with `fedtide certs --out DIR --server-name HOST`, "
            "or pass --insecure to run without TLS (testing only)"
        )
    certs = CertificateSet(Path(args.certs).expanduser().resolve())
    certs.require_server_files()
    if not certs.node_public_keys():
        raise FedtideError(
            f"--certs {certs.folder} holds no node-*.pub: make node keys with `fedtide certs --nodes N` "
            "or `fedtide certs --add-node NAME` (no node could authenticate)"
        )
    return certs


def serve(
    config: RunConfig, certs: CertificateSet | None, database: Path, address: str, start_timeout: float,
    console: Console, resume: bool = False,
) -> dict[str, Any]:
    """Start the SuperLink, register the nodes, run ``config`` on it (with ``resume``: go on
    after the last checkpoint of ``config.run.out``); return the run's summary."""
    host, port = parse_address(address, "--address")
    local_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    out = Path(config.run.out)
    _require_free_port(host, port)
    command = [
        flower_executable("flower-superlink"), "--database", str(database), "--host", host, "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    if certs is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth",
        ]
    if not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # the new run writes it anew; don't show the old one
    home = Path(tempfile.mkdtemp(prefix="fedtide-server-"))  # Flower's CLI config, FABs; never ~/.flwr
    try:
        superlink = FlowerProcess.start("the SuperLink", command, flower_env(home), out / "superlink.log")
        spawned = Descendants(superlink.process.pid, Path(config.run.out) / PROCESS_RECORD)
        try:
            superlink.wait_listening(local_host, port, start_timeout)
            write_connection(home, f"{local_host}:{port}", None if certs is None else certs.ca_cert)
            membership = None
            if certs is not None:
                membership = FleetMembership(home, certs, database, out, _say(console), resume)
                registered = membership.start()
                console.print(f"server: {registered} node key(s) registered; waiting for {config.data.clients} client(s) on {address}")
            run_id = flwr_cli(home, "run", str(write_app(home / "app", config, resume)))["run-id"]
            follow_run(home, run_id, config, superlink, console, spawned, membership)
        finally:
            superlink.stop()
            spawned.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    summary = json.loads((out / "summary.json").read_text())
    if not config.run.quiet:
        from server.progress import summary_table

        console.print(summary_table(summary))
    return summary


def _say(console: Console):
    """Print a line as it is (file and node names are never read as markup)."""
    return lambda line: console.print(line, markup=False, highlight=False)


def _require_free_port(host: str, port: int) -> None:
    """Fail before starting anything when ``host:port`` is taken (by another server, or by the
    SuperLink of a `fedtide server` that was killed before it could stop it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise FedtideError(
                f"--address {host}:{port} is not free ({err.strerror or err}): another server holds it; "
                "stop it or choose another --address"
            ) from None


def write_app(folder: Path, config: RunConfig, resume: bool = False) -> Path:
    """A Flower App whose run config is ``config``: the ServerApp and ClientApp come from the
    installed fedtide, on the server and on every client alike."""
    from server.app import RESUME_KEY

    folder.mkdir(parents=True, exist_ok=True)
    settings = {**config.to_mapping(), "quiet": True}  # the ServerApp has no terminal: this process shows progress
    if resume:
        settings[RESUME_KEY] = True
    lines = [
        "[project]",
        'name = "fedtide"',
        f'version = "{fedtide.__version__}"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedtide"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "server.app:app"',
        'clientapp = "client.app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


def follow_run(
    home: Path, run_id: str, config: RunConfig, superlink: FlowerProcess, console: Console,
    spawned: Descendants | None = None, membership: FleetMembership | None = None,
) -> None:
    """Show each finished round of the run folder until Flower reports the run finished;
    remember meanwhile what the SuperLink ``spawned``, and keep the registered nodes in step
    with the certificate folder (``membership``)."""
    from server.history import RoundRecord
    from server.progress import RoundProgress

    metrics = Path(config.run.out) / "metrics.jsonl"
    summary = Path(config.run.out) / "summary.json"
    started = time.time()
    shown = len(metrics.read_text().splitlines()) if metrics.exists() else 0  # a resumed run's earlier rounds
    next_status, failed_looks = time.monotonic() + STATUS_POLL_SECONDS, 0
    with RoundProgress(config.num_rounds, config.data.num_tasks, config.run.quiet, console, completed=shown) as progress:
        while True:
            if spawned is not None:
                spawned.remember()
            if not superlink.running():
                raise FedtideError(
                    f"the SuperLink stopped during the run (exit code {superlink.process.returncode}); "
                    f"its log {superlink.log} ends:\n{superlink.log_tail()}"
                )
            if membership is not None:
                membership.poll()
            text = metrics.read_text() if metrics.exists() else ""
            lines = text[: text.rfind("\n") + 1].splitlines()  # a line still being written waits
            for line in lines[shown:]:
                try:
                    record = RoundRecord.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged line (a killed earlier run's last) only costs the bar a step
                progress.round_done(record)
            shown = len(lines)
            written = summary.exists() and summary.stat().st_mtime >= started - 1
            if written or time.monotonic() >= next_status:
                try:
                    status = run_status(home, run_id)
                    failed_looks = 0
                except FedtideError:
                    failed_looks += 1  # a busy SuperLink may not answer once; five times is a real problem
                    if failed_looks >= 5:
                        raise
                    status = "unknown"
                if status.startswith("finished"):
                    break
                # the summary is the ServerApp's last word: its end is near, look again soon
                next_status = time.monotonic() + (1.0 if written else STATUS_POLL_SECONDS)
            time.sleep(0.5)
    if status != "finished:completed":
        log = run_log_tail(home, run_id, lines=200)
        said = re.search(r"FedtideError: (.+)", log)  # a user's mistake: its message says it all
        if said:
            raise FedtideError(said.group(1).strip())
        tail = "\n".join(log.splitlines()[-25:])
        raise FedtideError(f"the run ended as {status}; the ServerApp's log ends:\n{tail}")


def run_status(home: Path, run_id: str) -> str:
    runs = flwr_cli(home, "ls", options=("--run-id", str(run_id)))["runs"]
    return str(runs[0]["status"]) if runs else "unknown"


def run_log_tail(home: Path, run_id: str, lines: int = 25) -> str:
    import subprocess

    done = subprocess.run(
        [flower_executable("flwr"), "log", str(run_id), "fedtide", "--show"],
        env=flower_env(home), capture_output=True, text=True, timeout=60,
    )
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])
