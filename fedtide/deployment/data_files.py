"""``fedtide split-files``: a scenario's client streams as data files for edge clients.

Each simulated client's data becomes a sequence of ``.npz`` files, task by task
(``OUT/client-<i>/t<task>-<part>.npz``, numbered in stream order), in the format a
`fedtide client` reads from its data folder. Dropping them into a client's folder one after
the other replays the drift of the scenario on a real deployment: new classes arrive
(class-incremental), inputs rotate (domain-incremental), labels change meaning (concept drift).
Values are written as float32 exactly as the server's model sees them (after --normalize or
--pad-to), so the server's settings and the files agree.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig
from common.errors import FedtideError
from common.files import write_bytes_atomic
from fedtide.run_flags import add_config_flags, config_from_args


def add_parser(commands: Any, methods: bool = True) -> None:
    parser = commands.add_parser(
        "split-files",
        help="write a scenario's client streams as .npz data files for edge clients",
        description="Split a dataset as `fedtide simulate` would (same flags: --dataset, --scenario, --clients, "
        "--num-tasks, --alpha, --seed, ...) and write each client's stream as numbered .npz files, task by "
        "task: OUT/client-<i>/t<task>-<part>.npz. Drop them into a `fedtide client` data folder over time "
        "to replay the scenario's drift on a deployment; run the server with the same data settings.",
    )
    parser.add_argument("--to", required=True, metavar="DIR", help="folder to write the client folders into")
    parser.add_argument("--files-per-task", type=int, default=2, metavar="N", help="files per client and task (default: 2)")
    parser.add_argument("--force", action="store_true", help="write into a folder that already holds client folders")
    parser.add_argument("--preset", metavar="NAME", help="start from a named scenario (see `fedtide simulate --help`)")
    add_config_flags(parser, methods=methods)


def run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    written = write_client_files(config, Path(args.to), args.files_per_task, args.force)
    samples = sum(n for _, n in written)
    print(f"wrote {len(written)} files ({samples} samples) for {config.data.clients} clients to {args.to}")


def write_client_files(config: RunConfig, folder: Path, files_per_task: int, force: bool = False) -> list[tuple[Path, int]]:
    """Write every client's stream; return (file, samples) in writing order."""
    from common.scenarios import build_scenario

    if files_per_task < 1:
        raise FedtideError(f"--files-per-task must be at least 1 (got {files_per_task})")
    existing = sorted(folder.glob("client-*")) if folder.exists() else []
    if existing and not force:
        raise FedtideError(f"{folder} already holds {existing[0].name} and more: choose an empty --to or pass --force")
    scenario = build_scenario(config.data, config.seed)
    written = []
    for client in range(config.data.clients):
        for task in range(config.data.num_tasks):
            data = scenario.train_data(client, task)
            for part, index in enumerate(np.array_split(np.arange(len(data)), files_per_task)):
                if len(index) == 0:
                    continue
                buffer = io.BytesIO()
                np.savez(buffer, x=data.x[index].numpy().astype(np.float32), y=data.y[index].numpy())
                path = folder / f"client-{client + 1}" / f"t{task}-{part}.npz"
                write_bytes_atomic(path, buffer.getvalue())
                written.append((path, len(index)))
    return written
