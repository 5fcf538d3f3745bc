"""``fedtide models list|show|release|rollback RUN_DIR``: an operator's view of a run's model
registry (``server.model_registry``), and the two changes an operator makes to it.

Both changes work on a finished run and on a live one (``fedtide server`` reads the registry
before each round): a rollback is what devices are served from the next round on, and it
pauses automatic releases until ``fedtide models release`` releases a model again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def add_parser(commands: Any, methods: bool = True) -> argparse.ArgumentParser:
    models = commands.add_parser(
        "models", help="list a run's released models, release one, or roll back",
        description="A run folder's model registry: each round's global model is a candidate; those that pass the "
        "release gate become numbered versions, and one of them is served to the devices. Works on a finished run "
        "and on one a server is running (its next round serves the change).",
    )
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the released versions, the one served, the newest candidate")
    listing.add_argument("run_dir", metavar="RUN_DIR")
    listing.add_argument("--json", action="store_true", help="print the registry as JSON")
    show = actions.add_parser("show", help="one version's provenance, accuracies and the gate's decision")
    show.add_argument("run_dir", metavar="RUN_DIR")
    show.add_argument("version", type=int, metavar="VERSION")
    release = actions.add_parser(
        "release", help="release the newest candidate now, whatever the gate said; resumes automatic releases")
    release.add_argument("run_dir", metavar="RUN_DIR")
    release.add_argument("--note", default="", help="why (kept in the decision log)")
    rollback = actions.add_parser(
        "rollback", help="serve an earlier version again (bit-exact); pauses automatic releases")
    rollback.add_argument("run_dir", metavar="RUN_DIR")
    rollback.add_argument("--to", type=int, metavar="VERSION", help="the version to serve (default: the one released "
                          "before the version served now)")
    rollback.add_argument("--note", default="", help="why (kept in the decision log)")
    return models


def run(args: argparse.Namespace) -> None:
    """Carry out ``args.action``; FedtideError for a user's mistake (no registry, no such version)."""
    from rich.console import Console

    from server.model_registry import ModelRegistry

    registry = ModelRegistry(Path(args.run_dir))
    console = Console()
    if args.action == "list":
        with registry.open(write=False) as state:
            if args.json:
                print(json.dumps({"versions": state.versions, "released": state.released, "auto": state.auto,
                                  "candidate": state.candidate}, indent=2))
                return
            console.print(versions_table(state, args.run_dir))
    elif args.action == "show":
        with registry.open(write=False) as state:
            entry = state.version(args.version)
        decision = next((d for d in registry.decisions() if d.get("released") == args.version), None)
        print(json.dumps({**entry, "served": entry["version"] == state.released, "decision": decision}, indent=2))
    elif args.action == "release":
        with registry.open() as state:
            entry = registry.release_candidate(state, how="operator", note=args.note)
            state.auto = True
            registry.log({"operator": "release", "version": entry["version"], "round": entry["round"],
                          "note": args.note, "time": time.time()})
        console.print(f"released version {entry['version']} (round {entry['round']}, sha256 {entry['sha256'][:12]}); "
                      "automatic releases are on")
    else:
        with registry.open() as state:
            before = state.released
            entry = registry.rollback(state, args.to)
            registry.log({"operator": "rollback", "from": before, "version": entry["version"],
                          "round": entry["round"], "note": args.note, "time": time.time()})
        console.print(f"serving version {entry['version']} (round {entry['round']}, sha256 {entry['sha256'][:12]}) "
                      f"instead of {before}; automatic releases are paused until `fedtide models release`")


def _export(export: dict | None) -> str:
    if not export:
        return ""
    if not export.get("file"):
        return "removed"
    after = export.get("accuracy_after")
    return f"{export['file']} ({'n/a' if after is None else f'{100 * after:.1f}%'})"


def versions_table(state: Any, run_dir: str) -> Any:
    from rich.table import Table

    table = Table(title=f"fedtide models: {run_dir}")
    for column in ("version", "round", "task", "acc on tasks seen %", "how", "sha256", "weights", "export"):
        table.add_column(column, justify="right" if column in ("version", "round", "task", "acc on tasks seen %") else "left")
    for entry in state.versions:
        seen = entry["accuracies"][: entry["task"] + 1]
        mark = " *" if entry["version"] == state.released else ""
        table.add_row(f"{entry['version']}{mark}", str(entry["round"]), str(entry["task"]),
                      f"{100 * sum(seen) / len(seen):.2f}", entry["how"], entry["sha256"][:12],
                      "kept" if entry.get("file") else "removed", _export(entry.get("export")))
    candidate = state.candidate
    newest = "none" if candidate is None else f"round {candidate['round']} (sha256 {candidate['sha256'][:12]})"
    table.caption = (f"* served: version {state.released}; automatic releases "
                     f"{'on' if state.auto else 'paused (a rollback)'}; newest candidate: {newest}")
    return table
