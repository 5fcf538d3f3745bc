"""Starting and stopping Flower's own processes (SuperLink, SuperNode) and talking to the
SuperLink through Flower's ``flwr`` command line.

Each process leads a process group of its own, so that stopping it also stops what it
spawned (SuperExec, ServerApp and ClientApp processes); it stays in fedtide's session,
so whoever ends that session (a terminal, a test) ends the Flower processes too. Flower's command line reads its
SuperLink connections from ``$FLWR_HOME/config.toml``: fedtide writes a private home for
every server or client it starts, and never touches the user's own ``~/.flwr``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import FedtideError
from common.files import write_text_atomic

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies
CONNECTION = "fedtide"  # the name of the SuperLink connection in a private FLWR_HOME
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def flower_executable(name: str) -> str:
    """Flower's console script ``name`` from this Python's environment (then from PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedtideError(f"Flower's '{name}' command is not installed: reinstall fedtide (pip install -e .)")
    return found


def parse_address(address: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port), or a FedtideError naming ``flag``."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedtideError(f"{flag} {address!r} is not HOST:PORT, e.g. 127.0.0.1:9092")
    return host, int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def flower_env(home: Path) -> dict[str, str]:
    """This process's environment, offline, with ``home`` as FLWR_HOME."""
    return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home)}


@dataclass
class FlowerProcess:
    """A Flower process leading its own process group, logging to ``log``."""

    name: str
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, command: list[str], env: dict[str, str], log: Path) -> "FlowerProcess":
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as handle:
            process = start_group_leader(command, env, stdout=handle, stderr=subprocess.STDOUT)
        return cls(name, process, log)

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait_listening(self, host: str, port: int, timeout: float) -> None:
        """Return once ``host:port`` accepts connections; raise if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise FedtideError(
                    f"{self.name} stopped at start (exit code {self.process.returncode}); its log {self.log} ends:\n"
                    + self.log_tail()
                )
            try:
                with socket.create_connection((host, port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise FedtideError(f"{self.name} did not listen on {host}:{port} within {timeout:.0f} s; see {self.log}")

    def stop(self, grace: float = 10.0) -> None:
        stop_group(self.process, grace)


def start_group_leader(command: list[str], env: dict[str, str], **streams: Any) -> subprocess.Popen:
    """Start ``command`` as the leader of a new process group in this session; on Linux it is
    also told to stop (SIGTERM) when fedtide dies, even by SIGKILL, so that a killed server
    does not leave its SuperLink holding the port and the database."""
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, preexec_fn=_lead_group_and_follow_parent, **streams)


def _lead_group_and_follow_parent() -> None:  # runs in the child, between fork and exec
    os.setpgrp()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        except (OSError, AttributeError):
            pass


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants, parents first (read from /proc; on a system
    without /proc, just ``pid``). Flower starts some app processes in sessions of their own,
    so only the parent links find them all."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, index = [pid], 0
    while index < len(tree):
        tree += children.get(tree[index], [])
        index += 1
    return tree


def stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM ``process``'s group and every descendant, then SIGKILL what is left after
    ``grace`` seconds."""
    tree = process_tree(process.pid)  # before any signal: orphans lose their parent link
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        _signal_all(tree[1:], signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    tree += [pid for pid in process_tree(process.pid) if pid not in tree]
    signal_group(process, signal.SIGKILL)  # children that outlived their parent
    _signal_all(tree[1:], signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=grace)


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Descendants:
    """The processes a Flower process started (a SuperLink's SuperExec and ServerApp, a
    SuperNode's SuperExec and ClientApp), remembered while it runs. One killed outright
    (kill -9, the OOM killer) cannot stop them, and they no longer descend from it: an
    orphaned ServerApp holds the run folder's lock, an orphaned ClientApp may write the
    client's state. ``record``: a file that keeps them across a kill of fedtide itself, so that
    the next start stops them (``stop_leftovers``)."""

    def __init__(self, root: int, record: Path | None = None) -> None:
        self.root = root
        self.record = record
        self.seen: dict[int, int] = {}  # pid -> start time, so that a reused pid is never signalled

    def remember(self) -> None:
        before = len(self.seen)
        for pid in process_tree(self.root)[1:]:
            start = start_time(pid)
            if start is not None:
                self.seen.setdefault(pid, start)
        if self.record is not None and len(self.seen) != before:
            owner = {"pid": os.getpid(), "start": start_time(os.getpid())}
            write_text_atomic(self.record, json.dumps({"owner": owner,
                                                       "processes": {str(p): t for p, t in self.seen.items()}}))

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the remembered processes still running, SIGKILL them after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
            alive = [pid for pid, start in self.seen.items() if start_time(pid) == start]
            _signal_all(alive, sig)
            deadline = time.monotonic() + wait
            while alive and time.monotonic() < deadline:
                time.sleep(0.1)
                alive = [pid for pid in alive if start_time(pid) == self.seen[pid]]
        if self.record is not None:
            self.record.unlink(missing_ok=True)

    @classmethod
    def stop_leftovers(cls, record: Path, grace: float = 10.0) -> int:
        """Stop what an earlier, killed fedtide process recorded in ``record`` and is still
        running (same pid and start time); how many were still running. Nothing is touched
        while that fedtide process itself still runs (a second start is its own mistake, for
        the run lock to refuse); a damaged record is ignored."""
        leftovers = cls(0, record)
        try:
            saved = json.loads(record.read_text())
            owner = (int(saved["owner"]["pid"]), saved["owner"]["start"])
            leftovers.seen = {int(p): int(t) for p, t in saved["processes"].items()}
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, AttributeError, TypeError, KeyError):
            record.unlink(missing_ok=True)
            return 0
        if owner[1] is not None and start_time(owner[0]) == owner[1]:
            return 0
        alive = sum(1 for pid, start in leftovers.seen.items() if start_time(pid) == start)
        leftovers.stop(grace)
        return alive


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def write_connection(home: Path, address: str, root_certificate: Path | None) -> None:
    """Point Flower's command line in ``home`` at the SuperLink at ``address``."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    if root_certificate is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificate.resolve()}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr_cli(home: Path, *args: str, options: tuple[str, ...] = (), timeout: float = 120) -> dict:
    """Run ``flwr ARGS... fedtide OPTIONS... --format json`` and return its JSON answer, or raise FedtideError."""
    command = [flower_executable("flwr"), *args, CONNECTION, *options, "--format", "json"]
    try:
        done = subprocess.run(command, env=flower_env(home), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FedtideError(f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s") from None
    answer = _last_json(done.stdout)
    if answer is None or not answer.get("success", False):
        detail = (answer or {}).get("error-message") or (done.stderr or done.stdout).strip()[-800:]
        raise FedtideError(f"`flwr {' '.join(args)}` failed: {detail}")
    return answer


def _last_json(text: str) -> dict | None:
    """Flower prints a line or two before its JSON object; take the object."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return None
