"""A real federation on 127.0.0.1 for end-to-end tests and the deployment benchmark:
`fedtide server` and `fedtide client` as separate processes, data files dropped into
client folders, and cleanup of every process they started, even when a test fails.

Each started command leads a session of its own; ``Session.kill`` ends every process in
that session and every descendant of the command (Flower starts some app processes in
sessions of their own): its SuperLink or SuperNode, their SuperExec and app processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from fedtide.runtimes.flower_processes import process_tree

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def session_pids(session_id: int) -> list[int]:
    """Every live process whose session is ``session_id``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session_id:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Session:
    """``fedtide ARGS...`` started in a new session, its output in ``log``."""

    def __init__(self, args: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log = log
        env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), **(env or {})}
        self.remembered: set[int] = set()  # processes seen before the command alone was killed
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedtide.cli", *args], cwd=cwd, env=env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def pids(self) -> list[int]:
        tree = process_tree(self.process.pid)
        return tree + [pid for pid in session_pids(self.process.pid) if pid not in tree]

    def running_clientapp(self) -> bool:
        """Whether one of this session's processes is a Flower ClientApp (a round in progress)."""
        for pid in self.pids():
            try:
                if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
        return False

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal_clientapps(self, signum: int) -> int:
        """Send ``signum`` to the session's ClientApp processes (SIGSTOP: a round that hangs);
        return how many there were."""
        sent = 0
        for pid in self.pids():
            try:
                if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signum)
                    sent += 1
            except OSError:
                pass
        return sent

    def kill_command_only(self) -> None:
        """SIGKILL the command alone, as `kill -9 PID` would; what it started is remembered,
        so that ``kill`` still ends it whatever became of it."""
        self.remembered |= set(self.pids())
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def alive(self, name: str) -> list[int]:
        """Remembered or current processes whose command line contains ``name``, still running."""
        found = []
        for pid in self.remembered | set(self.pids()):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z" and name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    def kill(self) -> None:
        """SIGKILL every process of the session (and every one remembered), then reap the command."""
        for _ in range(3):  # a process may fork while we kill
            pids = self.pids() + [pid for pid in self.remembered if Path(f"/proc/{pid}").exists()]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not pids:
                break
            time.sleep(0.2)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.5) -> object:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def digits_arrays(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` of scikit-learn's 8x8 digits as uint8 images [N, 1, 8, 8] and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pick = np.random.default_rng(seed).permutation(len(digits.target))[:count]
    x = np.round(digits.images[pick] * 255 / 16).astype(np.uint8)[:, None]
    return x, digits.target[pick].astype(np.int64)


def drop_file(folder: Path, name: str, x: np.ndarray, y: np.ndarray) -> Path:
    """Write ``name`` as a data file the way a producer should: a temporary name, then rename."""
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{name}.tmp"
    with temporary.open("wb") as handle:
        np.savez(handle, x=x, y=y)
    final = folder / name
    os.replace(temporary, final)
    return final


def read_ledger(state_dir: Path) -> list[dict]:
    """Every file the client consumed, its last round's (still pending) included."""
    from client.state_store import ClientStateStore

    return ClientStateStore(state_dir).consumed()


def read_state(state_dir: Path) -> dict:
    from client.state_store import ClientStateStore

    return ClientStateStore(state_dir).latest()


class CountingRelay:
    """A TCP relay on 127.0.0.1 in front of ``target`` (HOST:PORT) that counts the bytes each
    way: what the wire carries between a client and the server, TLS records, HTTP/2 and gRPC
    framing, polls and heartbeats included. ``up``: client to server; ``down``: back."""

    def __init__(self, target: str) -> None:
        import threading

        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.up = self.down = 0
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.up, self.down

    def _accept(self) -> None:
        import threading

        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = self._connect()
            if server is None:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _connect(self, patience: float = 60.0) -> socket.socket | None:
        """The server's end, waiting while the server starts (a client would read a refused
        connection as a broken TLS handshake)."""
        deadline = time.monotonic() + patience
        while not self.closed and time.monotonic() < deadline:
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
                return server
            except OSError:
                time.sleep(0.2)
        return None

    def _pump(self, source: socket.socket, sink: socket.socket, way: str) -> None:
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
                with self.lock:
                    setattr(self, way, getattr(self, way) + len(chunk))
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
