"""Fleet membership on a running server: the SuperLink knows exactly the active node keys of
the certificate folder, and fedtide knows each one's Flower node id.

- ``NAME.pub`` appears (``fedtide certs --add-node``): the key is registered
  (``flwr supernode register``) and its node id recorded;
- ``NAME.pub`` leaves (``fedtide nodes revoke`` moves it to ``revoked/``, or it is deleted or
  replaced): its node id is unregistered (``flwr supernode unregister``). Flower then refuses
  the node's next request, even while it is online, and the ServerApp no longer sees it;
- every key in ``revoked/`` that the database still knows is unregistered too, so that a
  revocation holds on a database older than it.

The node ids live in ``<database>.nodes.json`` (a restarted server on the same database knows
the ids of keys that are "already in use"); the run folder gets ``nodes.json``,
``{"nodes": {"<node id>": "<name>"}}``, every node the run knew, replaced atomically on change.
Everything read from those files, the folder and the database is untrusted: bounded, validated.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

from common.errors import FedtideError
from common.files import write_json_atomic
from fedtide.deployment.cert_files import CertificateSet, NodeKey, is_node_name, read_regular_file
from fedtide.runtimes.flower_processes import flwr_cli
from server.node_names import NODES_FILE as RUN_NODES  # in the run folder: node id -> name (the ServerApp reads it)

REGISTRY_SUFFIX = ".nodes.json"  # beside the database: name -> node id and key fingerprint
SERVER_NOTE = ".fedtide-server.json"  # in the certificate folder: the database its server last used
MAX_JSON_BYTES = 1 << 20
MAX_NODES = 10_000
LOOK_EVERY = 3.0  # seconds between looks at the certificate folder (a listdir and a stat per key)
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
ALREADY_IN_USE, NOT_FOUND = "already in use", "not found"  # in Flower's answers


@dataclass(frozen=True)
class Registered:
    """A node key the SuperLink knows: its Flower node id and its key's fingerprint."""

    node_id: int
    fingerprint: str


@dataclass(frozen=True)
class DatabaseNode:
    """A row of the SuperLink's node table, read-only."""

    node_id: int
    status: str  # registered, online, offline or unregistered
    online_until: float | None

    @property
    def online(self) -> bool:
        return self.status == "online" and self.online_until is not None and self.online_until > time.time()


def registry_path(database: Path) -> Path:
    return Path(database).with_name(Path(database).name + REGISTRY_SUFFIX)


def read_json_bounded(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in the regular file ``path`` (no link followed, at most ``limit`` bytes),
    or None when it is missing, too large, not a regular file or not JSON."""
    data = read_regular_file(path, limit)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def parse_node_id(value: object) -> int | None:
    """A Flower node id (decimal string or int, 1 .. 2^64-1), or None."""
    if isinstance(value, bool):
        return None
    text = str(value) if isinstance(value, int) else value
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 20:
        return None
    number = int(text)
    return number if 0 < number < 2**64 else None


def load_registry(path: Path) -> dict[str, Registered]:
    """The registry at ``path``; entries with a bad name, id or fingerprint are left out, and a
    missing, damaged or oversized file is an empty registry (its ids are then looked up again)."""
    saved = read_json_bounded(path)
    nodes = saved.get("nodes") if isinstance(saved, dict) else None
    if not isinstance(nodes, dict):
        return {}
    entries: dict[str, Registered] = {}
    for name, entry in list(nodes.items())[:MAX_NODES]:
        if not is_node_name(name) or not isinstance(entry, dict):
            continue
        node_id, fingerprint = parse_node_id(entry.get("node-id")), entry.get("fingerprint")
        if node_id is not None and isinstance(fingerprint, str) and FINGERPRINT.fullmatch(fingerprint):
            entries[name] = Registered(node_id, fingerprint)
    return entries


def save_registry(path: Path, entries: dict[str, Registered]) -> None:
    write_json_atomic(path, {"nodes": {name: {"node-id": str(e.node_id), "fingerprint": e.fingerprint}
                                       for name, e in entries.items()}})


def load_run_nodes(run_dir: Path) -> dict[int, str]:
    """``RUN_DIR/nodes.json`` as node id -> name (bad entries left out)."""
    saved = read_json_bounded(Path(run_dir) / RUN_NODES)
    nodes = saved.get("nodes") if isinstance(saved, dict) else None
    if not isinstance(nodes, dict):
        return {}
    return {node_id: name for key, name in list(nodes.items())[:MAX_NODES]
            if (node_id := parse_node_id(key)) is not None and is_node_name(name)}


def write_run_nodes(run_dir: Path, names: dict[int, str]) -> None:
    write_json_atomic(Path(run_dir) / RUN_NODES, {"nodes": {str(i): n for i, n in sorted(names.items())}})


def database_nodes(database: Path) -> dict[bytes, DatabaseNode]:
    """The SuperLink database's nodes by public key (Flower's PEM bytes), read-only; empty
    when the file is missing or not a database Flower wrote as expected."""
    if not Path(database).is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{quote(str(database))}?mode=ro", uri=True, timeout=5) as connection:
            rows = connection.execute(
                "SELECT node_id, status, online_until, public_key FROM node LIMIT ?", (MAX_NODES * 4,)
            ).fetchall()
    except sqlite3.Error:
        return {}
    found = {}
    for node_id, status, online_until, public_key in rows:
        if isinstance(node_id, int) and isinstance(public_key, bytes) and isinstance(status, str):
            online = float(online_until) if isinstance(online_until, (int, float)) else None
            found[public_key] = DatabaseNode(node_id % 2**64, status, online)  # stored as a signed int64
    return found


def note_database(certs: CertificateSet, database: Path) -> None:
    """Tell ``fedtide nodes list`` which database this folder's server uses; best effort (a
    read-only folder, as in Docker, just goes without)."""
    try:
        write_json_atomic(certs.folder / SERVER_NOTE, {"database": str(database)})
    except OSError:
        pass


def noted_database(certs: CertificateSet) -> Path | None:
    saved = read_json_bounded(certs.folder / SERVER_NOTE, limit=8192)
    path = saved.get("database") if isinstance(saved, dict) else None
    return Path(path) if isinstance(path, str) and os.path.isabs(path) and "\0" not in path else None


class FleetMembership:
    """Keeps the SuperLink's registered nodes in step with ``certs`` (see the module's doc).

    ``start`` once the SuperLink listens; then ``poll`` as often as you like: it looks at the
    folder every ``LOOK_EVERY`` seconds (a listdir and a stat per key) and calls Flower's CLI
    only when a key came, left or was replaced, or an earlier change is not done yet."""

    def __init__(self, home: Path, certs: CertificateSet, database: Path, run_dir: Path,
                 say: Callable[[str], None], resume: bool = False) -> None:
        self.home, self.certs, self.database, self.run_dir, self.say = home, certs, database, Path(run_dir), say
        self.registry_file = registry_path(database)
        self.registered = load_registry(self.registry_file)
        self.run_names = load_run_nodes(self.run_dir) if resume else {}  # a resumed run keeps its earlier nodes' names
        self._seen: tuple | None = None
        self._pending = False
        self._next_look = 0.0

    def start(self) -> int:
        """Register every active key, unregister the revoked ones; the number of active keys."""
        note_database(self.certs, self.database)
        self._seen = self._folder_state()
        self._sync(starting=True)
        return len(self.registered)

    def poll(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now < self._next_look:
            return
        self._next_look = now + LOOK_EVERY
        seen = self._folder_state()
        if seen != self._seen or self._pending:
            self._seen = seen
            self._sync(starting=False)

    def _folder_state(self) -> tuple:
        """What a change of membership changes: each .pub's name, inode, size and mtime."""
        state = []
        for folder in (self.certs.folder, self.certs.revoked_folder):
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.name.endswith(".pub"):
                            st = entry.stat(follow_symlinks=False)
                            state.append((str(folder), entry.name, st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                continue
        return tuple(sorted(state))

    def _sync(self, starting: bool) -> None:
        revoked = {key.fingerprint: key for key in self.certs.revoked_nodes()}
        active = {key.name: key for key in self.certs.active_nodes() if key.fingerprint not in revoked}
        before, pending = dict(self.registered), False
        for name, entry in before.items():  # keys that left or were replaced
            key = active.get(name)
            if key is None or key.fingerprint != entry.fingerprint:
                why = "revoked" if entry.fingerprint in revoked else "its key left the --certs folder"
                if self._unregister(entry.node_id, name, why):
                    del self.registered[name]
                else:
                    pending = True
        for name, key in active.items():  # keys that came; at start all of them (the database may be new)
            if starting or name not in self.registered:
                node_id, retry = self._register(key, strict=starting)
                pending = pending or retry
                if node_id is not None:
                    self.registered[name] = Registered(node_id, key.fingerprint)
                    if not starting:
                        self.say(f"server: node {name} registered (node id {node_id})")
        still_known = database_nodes(self.database)  # revoked keys an older database still knows
        for key in revoked.values():
            row = still_known.get(key.flower_bytes())
            if row is not None and row.status != "unregistered":
                pending = not self._unregister(row.node_id, key.name, "revoked") or pending
        self._pending = pending
        if starting or self.registered != before:
            save_registry(self.registry_file, self.registered)
        names = {**self.run_names, **{e.node_id: name for name, e in self.registered.items()}}
        if starting or names != self.run_names:
            self.run_names = names
            write_run_nodes(self.run_dir, names)

    def _register(self, key: NodeKey, strict: bool) -> tuple[int | None, bool]:
        """Register ``key``: its node id (None when it cannot be known, said why) and whether
        to try again later. ``strict``: a failure other than "already in use" raises (at start,
        nothing runs yet)."""
        try:
            answer = flwr_cli(self.home, "supernode", "register", str(key.path), options=("--name", key.name))
            node_id = parse_node_id(answer.get("node-id"))
            if node_id is not None:
                return node_id, False
            problem = "Flower's answer held no node id"
        except FedtideError as err:
            if ALREADY_IN_USE not in str(err):
                if strict:
                    raise FedtideError(f"could not register the node key {key.path}: {err}") from None
                self.say(f"server: warning: could not register node {key.name}, will try again: {_last_line(err)}")
                return None, True
            row = database_nodes(self.database).get(key.flower_bytes())  # the database knows best
            entry = self.registered.get(key.name)
            if row is not None and row.status != "unregistered":
                return row.node_id, False
            if row is None and entry is not None and entry.fingerprint == key.fingerprint:
                return entry.node_id, False
            problem = ("its key was revoked on this database and cannot join again: make the device a new key "
                       "with `fedtide certs --out DIR --add-node NAME`" if row is not None
                       else "its key is in use but its node id is unknown")
        self.say(f"server: warning: node {key.name}: {problem}")
        return None, False

    def _unregister(self, node_id: int, name: str, why: str) -> bool:
        """Unregister ``node_id``; whether it is gone (it may have been already)."""
        try:
            flwr_cli(self.home, "supernode", "unregister", str(node_id))
        except FedtideError as err:
            if NOT_FOUND not in str(err):
                self.say(f"server: warning: could not unregister node {name} (node id {node_id}), will try again: "
                         f"{_last_line(err)}")
                return False
            return True
        self.say(f"server: node {name} unregistered (node id {node_id}): {why}")
        return True


def _last_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else str(err)
