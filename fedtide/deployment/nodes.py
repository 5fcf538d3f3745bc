"""``fedtide nodes``: the federation's members, from its certificate folder.

``list`` shows each node's name, status (active, revoked), key fingerprint and, once a server
has used the folder, its Flower node id and whether it is online (from the server's registry
and the SuperLink's database, read-only). ``revoke NAME`` moves ``NAME.pub`` to ``revoked/``:
the key is kept as the record, a running server unregisters the node within seconds (Flower
refuses its next request) and a server started later unregisters it on start.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from common.errors import FedtideError
from fedtide.deployment.cert_files import REVOKED, CertificateSet, NodeKey, check_node_name, node_file_names
from fedtide.deployment.membership import database_nodes, load_registry, noted_database, registry_path

COLUMNS = ("name", "status", "fingerprint", "node id", "online")


def add_parser(commands: Any, methods: bool = True) -> None:
    parser = commands.add_parser(
        "nodes", help="list the federation's nodes, or revoke one",
        description="List the nodes of a certificate folder, or revoke one; a running `fedtide server` "
        "picks up revocations (and keys added with `fedtide certs --add-node`) within seconds.",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="name, status, key fingerprint, Flower node id and online state")
    listing.add_argument("--certs", required=True, metavar="DIR", help="the server's certificate folder")
    listing.add_argument("--database", metavar="FILE",
                         help="the server's --database (default: the one its server last used with --certs)")
    revoke = actions.add_parser("revoke", help="revoke a node: move NAME.pub to DIR/revoked/")
    revoke.add_argument("--certs", required=True, metavar="DIR", help="the server's certificate folder")
    revoke.add_argument("name", metavar="NAME", help="the node's name, e.g. node-3")


def run(args: argparse.Namespace) -> None:
    certs = CertificateSet(Path(args.certs).expanduser())
    if not certs.folder.is_dir():
        raise FedtideError(f"--certs {args.certs} is not a folder: give the one made by `fedtide certs`")
    if args.action == "revoke":
        moved = revoke_node(certs, args.name)
        print(f"node {args.name} revoked (its key is kept in {moved}); a running server unregisters it within "
              "seconds, one started later on start")
        return
    database = Path(args.database).expanduser().resolve() if args.database else noted_database(certs)
    rows = node_table(certs, database)
    widths = [max(len(row[i]) for row in (COLUMNS, *rows)) for i in range(len(COLUMNS))]
    for row in (COLUMNS, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if database is None:
        print("fedtide nodes: (no server has used this folder yet, or it could not note its database: pass --database FILE "
              "for node ids)", file=sys.stderr)


def revoke_node(certs: CertificateSet, name: str) -> Path:
    """Move ``NAME.pub`` into ``revoked/`` (created 0755); where it now is."""
    check_node_name(name)
    public = certs.folder / node_file_names(name)[1]
    target = certs.revoked_folder / public.name
    if os.path.lexists(target):
        raise FedtideError(f"node {name} is already revoked ({target} exists)")
    if not public.is_file() or public.is_symlink():
        raise FedtideError(f"{certs.folder} has no node {name} ({public.name}): see `fedtide nodes list --certs DIR`")
    try:
        certs.revoked_folder.mkdir(mode=0o755, exist_ok=True)
        if certs.revoked_folder.is_symlink() or not certs.revoked_folder.is_dir():
            raise FedtideError(f"{certs.revoked_folder} is not a folder: move it away, then revoke again")
        os.rename(public, target)  # same file system: the key is never in both places or in neither
    except OSError as err:
        raise FedtideError(f"cannot move {public} to {REVOKED}/ ({err.strerror or err}): is {certs.folder} writable?") from None
    return target


def node_table(certs: CertificateSet, database: Path | None) -> list[tuple[str, ...]]:
    """One row per node (active ones first, each group in node order), cells as text."""
    registry = load_registry(registry_path(database)) if database is not None else {}
    rows_in_db = database_nodes(database) if database is not None else {}

    def row(key: NodeKey, status: str) -> tuple[str, ...]:
        entry = registry.get(key.name)
        known = rows_in_db.get(key.flower_bytes())
        node_id = entry.node_id if entry is not None and entry.fingerprint == key.fingerprint else None
        if node_id is None and known is not None:
            node_id = known.node_id
        online = "-" if known is None else "yes" if known.online else "no"
        return key.name, status, key.fingerprint, "-" if node_id is None else str(node_id), online

    return [row(key, "active") for key in certs.active_nodes()] + [row(key, "revoked") for key in certs.revoked_nodes()]
