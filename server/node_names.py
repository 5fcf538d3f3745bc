"""Human names for Flower node ids (``node-3`` beside 6435071288605390923).

`fedtide server` knows which node key got which Flower node id when it registers the keys,
and keeps ``RUN_DIR/nodes.json`` (``{"nodes": {"<node id>": "<name>"}}``) up to date; the
ServerApp reads it here when it writes a record or a log line (a simulation has no such file:
its nodes go by their ids). The file is read as untrusted input: bounded in size, names
checked; a bad or missing file only means ids without names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

NODES_FILE = "nodes.json"
MAX_BYTES = 4 * 2**20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class NodeNames:
    """``name(node_id)``: the node's name or None; re-reads the file when it changed."""

    def __init__(self, folder: Path | None) -> None:
        self.path = None if folder is None else Path(folder) / NODES_FILE
        self._seen: tuple[int, int] | None = None
        self._names: dict[int, str] = {}

    def name(self, node_id: int) -> str | None:
        self._refresh()
        return self._names.get(int(node_id))

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            info = os.stat(self.path)
        except OSError:
            self._names, self._seen = {}, None
            return
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp == self._seen:
            return
        self._seen = stamp
        self._names = read_names(self.path)


def read_names(path: Path) -> dict[int, str]:
    """The id -> name map of a nodes file; entries that are not an id and a safe name are left out."""
    try:
        if path.stat().st_size > MAX_BYTES:
            return {}
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    nodes = document.get("nodes") if isinstance(document, dict) else None
    if not isinstance(nodes, dict):
        return {}
    names = {}
    for node_id, name in nodes.items():
        if isinstance(node_id, str) and node_id.isdigit() and len(node_id) <= 20 and isinstance(name, str) \
                and _NAME.match(name):
            names[int(node_id)] = name
    return names
