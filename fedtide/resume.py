"""``--resume RUN_DIR`` of ``fedtide simulate`` and ``fedtide server``: the run's own settings,
checked before anything starts.

A resumed run computes what the uninterrupted run would have, so its settings come from
RUN_DIR/config.json; a flag that would change what is computed is refused, and so is a
config.json changed since the checkpoints were written (they record the settings). Flags
that only say where data is or how long to wait may differ.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.config import RunConfig
from common.errors import FedtideError


def resume_config(args: argparse.Namespace) -> RunConfig | None:
    """The settings to go on with, or None when the run already finished (nothing to do).
    FedtideError when RUN_DIR is missing, is no run folder, has no checkpoint, runs in another
    process, or a flag or an edit of its config.json contradicts its settings."""
    from server.checkpoint import CHECKPOINT_FOLDER, CheckpointStore
    from server.run_lock import hold_run_folder
    from server.run_state import RESUME_MAY_CHANGE, check_settings

    folder = Path(args.resume).expanduser()
    if not folder.is_dir():
        raise FedtideError(f"--resume {folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    stored = _stored_config(folder)
    with hold_run_folder(folder):  # a run going on there (another process) is refused before anything starts
        pass
    store = CheckpointStore(folder)
    check_settings(store.newest_meta().get("settings"), stored, str(folder / "config.json"))
    adjustable = [name.replace("-", "_") for name in RESUME_MAY_CHANGE if name != "out"]
    if getattr(args, "preset", None):
        raise FedtideError(f"--resume takes the settings of {folder / 'config.json'}: drop --preset")
    from fedtide.run_flags import given_flags

    changes, refused = {}, []
    has = stored.to_mapping()
    for name, given in given_flags(args).items():
        flag = name.replace("_", "-")
        if name == "out":
            if Path(given).expanduser().resolve() != folder.resolve():
                refused.append(f"--out {given}")
        elif name in adjustable:
            changes[name] = given
        elif given != has.get(flag):
            refused.append(f"--{flag} {given} (the run has {has.get(flag)})")
    if refused:
        raise FedtideError(
            f"--resume keeps the settings of {folder / 'config.json'}; {', '.join(refused)} would change what "
            "the run computes: drop it, or start a new run with --out"
        )
    rounds = store.rounds()
    if not rounds:
        raise FedtideError(
            f"--resume {folder}: no checkpoints ({CHECKPOINT_FOLDER}/round-*.json); the run stopped before "
            "its first round was evaluated, or was made by a fedtide without checkpoints: start it again"
        )
    if rounds[0] >= stored.num_rounds and (folder / "summary.json").is_file():
        return None
    return stored.replace(out=str(folder), **changes)


def recorded_runtime(folder: Path) -> dict:
    """How the run in ``folder`` ran (``workers``, ``vectorize``), from its newest
    checkpoint's metadata; {} when unreadable (resuming then checks the checkpoint properly)."""
    from server.checkpoint import CheckpointStore

    runtime = CheckpointStore(folder).newest_meta().get("runtime")
    return dict(runtime) if isinstance(runtime, dict) else {}


def _stored_config(folder: Path) -> RunConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise FedtideError(f"--resume {folder}: no config.json there, so it is not a fedtide run folder")
    try:
        return RunConfig.from_mapping(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        raise FedtideError(f"--resume {folder}: config.json is unreadable ({err})") from None
    except FedtideError as err:
        raise FedtideError(f"--resume {folder}: config.json: {err}") from None


def finished_message(folder: str) -> str:
    return f"fedtide: {folder} already finished all its rounds (see its summary.json); nothing to resume"
