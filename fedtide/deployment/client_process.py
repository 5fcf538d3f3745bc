"""``fedtide client``: a Flower SuperNode on an edge device, running the fedtide ClientApp on
the data files that arrive in a folder.

The node signs in with its private key (its public key must be registered on the server),
trusts the server through the federation's CA certificate, and keeps its continual-learning
state (replay memory, drift detector, consumed-file ledger, EWC/LwF anchors) in the state
folder, so a restarted client goes on where it stopped. Flower's log is shown as it comes;
when the SuperNode exits with an error, fedtide says what the likely cause is. Once the run
is over (the ClientApp trained its last round and the server went away), the client ends too,
unless told to ``--stay`` for the next run.

On an edge device memory is scarce, and this process only watches the SuperNode for as long
as the client runs: once the flags are checked, the `fedtide` command replaces itself (same
process id) by a fresh interpreter running this module, which imports none of what the rest
of the command line needs (numpy, rich, every subcommand's settings: some 20 MB).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from client.feature_range import parse_feature_range
from common.errors import FedtideError
from common.receipt import NEW_RUN_CHOICES, RUN_FINISHED_FILE
from common.files import ensure_writable_folder
from fedtide.deployment.cert_files import CA_CERT, is_node_name
from fedtide.deployment.supernode import rejoin_wait_seconds
from fedtide.runtimes.flower_processes import (
    Descendants, flower_env, flower_executable, free_port, parse_address, signal_group, start_group_leader, stop_group,
)

REFUSED = "Failed to activate SuperNode"  # Flower's words when the SuperLink does not let the node in
REVOKED = "401 Unauthorized"  # what Flower's SuperNode logs when the SuperLink no longer knows its key
REVOKED_HINT = ("the server no longer accepts this node's key (revoked with `fedtide nodes revoke`?): a revoked key "
                "cannot join again; the device needs a new key, made on the server with "
                "`fedtide certs --out DIR --add-node NAME`")
# what Flower's log says, and what it means for the user
HINTS = (
    (REFUSED, "the server refused this node: its public key (NAME.pub beside --node-key) is not registered "
     "there, or was revoked. On the server, `fedtide nodes list --certs DIR` shows it; add a device with "
     "`fedtide certs --out DIR --add-node NAME` (a running server registers it within seconds, no restart); "
     "a revoked key cannot join again: give the device a new name and key"),
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate does not verify against --certs DIR/ca.crt, or is not "
     "made for the host name in --server: make certificates with `fedtide certs --server-name HOST`"),
    ("Connection refused", "nothing listens at --server: is `fedtide server` running and is the address right?"),
)


def add_parser(commands: Any, methods: bool = True) -> None:
    parser = commands.add_parser(
        "client",
        help="start an edge client: Flower SuperNode training on data files that arrive in a folder",
        description="Start a Flower SuperNode that runs the fedtide ClientApp. Each round it trains on the "
        "data files of --data it has not consumed yet (.npz with arrays x and y, or .csv with a 'label' "
        "column; write a file under a temporary name, then rename it) plus its replay memory, and reports "
        "prequential accuracy on the new data. Its state lives in --state and survives restarts.",
    )
    parser.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    parser.add_argument("--certs", metavar="DIR", help="folder holding the federation's ca.crt")
    parser.add_argument("--node-key", metavar="KEY", help="this node's private key (node-N.key from `fedtide certs`)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (testing only)")
    parser.add_argument("--data", required=True, metavar="DIR", help="folder where new data files arrive")
    parser.add_argument("--state", required=True, metavar="DIR", help="folder for this client's state (keep it)")
    parser.add_argument("--device", default=None, help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--feature-range", default=None, metavar="LOW,HIGH",
                        help="the range every float value of a data file must lie in (uint8 pixels are scaled "
                        "to [0, 1] first); a file with a value outside is quarantined (default: 0,1, the "
                        "datasets' pixel range; write --feature-range=-1,4 for a negative LOW)")
    parser.add_argument("--max-wait", type=float, default=None, metavar="SECONDS",
                        help="give up when the server cannot be reached or refuses this node for this long "
                        "(default: keep trying)")
    parser.add_argument("--new-run", choices=NEW_RUN_CHOICES, default="fresh",
                        help="when the server starts a new run while --state holds another run's state: fresh "
                        "(default) moves that state to --state/previous-runs/ and starts clean, every file in "
                        "--data new to the run; keep carries it into the new run; refuse stops with a message")
    parser.add_argument("--stay", action="store_true",
                        help="keep waiting for the next run once the run is over (default: end with the run, "
                        f"{RUN_END_GRACE:.0f} s after its last round when the server is gone)")


def run(args: argparse.Namespace) -> int:
    """Run the SuperNode until it stops; return its exit code."""
    parse_address(args.server, "--server")
    feature_range = None if args.feature_range is None else parse_feature_range(args.feature_range)
    flower_executable("flower-supernode")  # says how to fix an installation without Flower's SuperNode
    command = [sys.executable, "-m", "fedtide.deployment.supernode", "--superlink", args.server]
    if args.insecure:
        print("fedtide client: warning: --insecure: no TLS and no node authentication", file=sys.stderr)
        command.append("--insecure")
    else:
        command += _secure_flags(args)
    data = ensure_writable_folder(Path(args.data).expanduser().resolve(), "the data folder", "--data")
    state = ensure_writable_folder(Path(args.state).expanduser().resolve(), "the state folder", "--state")
    node_config = f'inbox="{data}" state-dir="{state}" new-run="{args.new_run}"'
    if args.node_key and not args.insecure:
        node_config += f' name="{_node_name(Path(args.node_key))}"'
    if args.device:
        node_config += f' device="{args.device}"'
    if feature_range is not None:
        node_config += f' feature-range="{feature_range[0]!r},{feature_range[1]!r}"'
    command += ["--node-config", node_config, "--port", str(free_port())]
    if args.max_wait is not None:
        command += ["--max-wait-time", str(args.max_wait)]
    (state / RUN_FINISHED_FILE).unlink(missing_ok=True)  # a client started after a run waits for the next one
    record = state / PROCESS_RECORD
    if leftovers := Descendants.stop_leftovers(record):
        print(f"fedtide client: stopped {leftovers} process(es) a killed earlier client left running",
              file=sys.stderr)
    plan = {"command": command, "home": str(state / "flower-home"), "max_wait": args.max_wait, "record": str(record),
            "state": str(state), "stay": bool(args.stay)}
    if _is_the_fedtide_command():
        _supervise_lean(plan)  # returns only where a fresh interpreter cannot be started
    return _supervise_plan(plan)


def _is_the_fedtide_command() -> bool:
    """Whether this process is the `fedtide` command (its console script or ``python -m
    fedtide.cli``), not a program that calls the command line in its own process (a test)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return (spec is not None and spec.name == "fedtide.cli") or Path(sys.argv[0]).name == "fedtide"


def _supervise_lean(plan: dict[str, Any]) -> None:
    """Go on supervising in a fresh interpreter that runs this module: ``os.execv`` keeps the
    process id, its session and its parent, so whoever started `fedtide client` (a terminal,
    systemd, Docker) still holds it and its signals still reach it."""
    if not sys.executable:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        os.execv(sys.executable, [sys.executable, "-m", __name__, json.dumps(plan)])
    except OSError:
        return


def _supervise_plan(plan: dict[str, Any]) -> int:
    record = Path(plan["record"]) if plan["record"] else None
    run_end = None if plan.get("stay") or not plan.get("state") else RunEnd(Path(plan["state"]))
    return _supervise(plan["command"], flower_env(Path(plan["home"])), plan["max_wait"], record, run_end)


def _node_name(key: Path) -> str:
    """The node's name as its key file says it (``node-3.key``: node-3), for the device's log."""
    name = key.name.removesuffix(".key")
    return name if is_node_name(name) else "node"


RUN_END_GRACE = 60.0  # seconds the server may be gone after the last round before the client ends


class RunEnd:
    """Whether the run is over for this client: its ClientApp trained the run's last round
    (``run-finished`` in the state folder) and the server has been unreachable for
    ``RUN_END_GRACE`` seconds since (a server that comes back sooner, resumed, keeps it)."""

    def __init__(self, state: Path, grace: float = RUN_END_GRACE) -> None:
        self.marker = state / RUN_FINISHED_FILE
        self.grace = grace
        self.unreachable_since: float | None = None

    def saw(self, line: str) -> None:
        """Follow the SuperNode's log: failed connection attempts, and anything that works."""
        if "Connection attempt failed" in line:
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
        elif "Connection successful" in line or "Received successfully" in line:
            self.unreachable_since = None

    def over(self) -> bool:
        return (self.unreachable_since is not None and time.monotonic() - self.unreachable_since >= self.grace
                and self.marker.is_file())


def _secure_flags(args: argparse.Namespace) -> list[str]:
    if not args.certs or not args.node_key:
        raise FedtideError(
            "--certs DIR and --node-key KEY are required (from `fedtide certs`), or pass --insecure (testing only)"
        )
    ca = Path(args.certs).expanduser().resolve() / CA_CERT
    if not ca.is_file():
        raise FedtideError(f"--certs {args.certs} has no {CA_CERT}: copy the server's certificate folder (without its keys)")
    key = Path(args.node_key).expanduser().resolve()
    _check_node_key(key)
    return ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]


def _check_node_key(key: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        loaded = load_ssh_private_key(key.read_bytes(), password=None)
    except OSError as err:
        raise FedtideError(f"--node-key {key}: cannot read it ({err.strerror or err})") from None
    except (ValueError, TypeError):
        loaded = None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise FedtideError(
            f"--node-key {key} is not an unencrypted OpenSSH EC private key: use a node-N.key made by `fedtide certs`"
        )


PROCESS_RECORD = "flower-processes.json"  # in the state folder: what the running SuperNode started
MAX_RETRY_PAUSE = 4.0  # seconds between attempts once the first quick retries failed


def _supervise(command: list[str], env: dict[str, str], max_wait: float | None, record: Path | None = None,
               run_end: RunEnd | None = None) -> int:
    """Run the SuperNode and echo its log; start it again when a signal killed it, and while
    the server refuses it (not up yet, or this node not registered yet) until ``max_wait``
    passes; stop it on SIGTERM/SIGINT, and once ``run_end`` says the run is over; explain a
    failure."""
    stopping = threading.Event()
    current: list[subprocess.Popen] = []

    def stop(signum, frame):  # noqa: ARG001 - signal handler signature
        stopping.set()
        if current:
            signal_group(current[-1], signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    deadline = None if max_wait is None else time.monotonic() + max_wait
    pause = 2.0
    try:
        while True:
            code, log = _run_once(command, env, current, record, run_end)
            if run_end is not None and run_end.over():
                print(f"fedtide client: the run is over (its last round trained, the server gone for "
                      f"{run_end.grace:.0f} s): stopping; start the client again for the next run, or give it "
                      "--stay", file=sys.stderr)
                return 0
            if not stopping.is_set() and REVOKED in log:
                raise FedtideError(REVOKED_HINT)
            if stopping.is_set() or code == 0:
                return 0
            if code < 0:  # killed by a signal this process did not send: the OOM killer, a kill -9
                print(f"fedtide client: the SuperNode was killed by signal {-code}; starting it again "
                      f"in {pause:.0f} s", file=sys.stderr)
                if stopping.wait(pause):
                    return 0
                pause = min(pause * 2, MAX_RETRY_PAUSE)
                continue
            refused = REFUSED in log
            if refused and (deadline is None or time.monotonic() + pause < deadline):
                print(f"fedtide client: the server refused the connection (not up yet, this node's key not "
                      f"registered or revoked, or this node's previous session, if it was killed, not expired yet: "
                      f"that takes up to {rejoin_wait_seconds()} s); trying again in {pause:.0f} s",
                      file=sys.stderr)
                if stopping.wait(pause):
                    return 0
                # a restarted client is refused until the SuperLink lets its last session expire
                # (two missed heartbeats): retry often enough to rejoin within a round
                pause = min(pause * 2, MAX_RETRY_PAUSE)
                continue
            hint = next((meaning for needle, meaning in HINTS if needle in log), "see Flower's log above")
            raise FedtideError(f"the SuperNode stopped with exit code {code}: {hint}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_once(command: list[str], env: dict[str, str], current: list[subprocess.Popen],
              record: Path | None = None, run_end: RunEnd | None = None) -> tuple[int, str]:
    """One SuperNode process until it exits: its exit code and the end of its log. What it
    starts is remembered in ``record`` meanwhile, and stopped after it (a ClientApp runs in
    a session of its own and outlives a killed SuperNode)."""
    process = start_group_leader(command, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    current.append(process)
    spawned = Descendants(process.pid, record)
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(1.0):
            spawned.remember()
            if run_end is not None and run_end.over():
                signal_group(process, signal.SIGTERM)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    tail: collections.deque[str] = collections.deque(maxlen=60)

    def echo() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stderr.write(line)
            tail.append(line)
            if run_end is not None:
                run_end.saw(line)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        code = process.wait()
    finally:
        watching.set()
        watcher.join(timeout=5)
        stop_group(process)  # its SuperExec may outlive it (and hold the log pipe open)
        spawned.stop()
        reader.join(timeout=5)
    return code, "".join(tail)


def main(argv: list[str]) -> int:
    """The supervisor alone (``python -m fedtide.deployment.client_process PLAN``, PLAN as
    `fedtide client` writes it): errors and exit codes as the `fedtide` command gives them."""
    try:
        return _supervise_plan(json.loads(argv[0]))
    except FedtideError as err:
        print(f"fedtide: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
