"""Deployment figures on loopback: `fedtide server` (SuperLink, TLS, node authentication) and
two `fedtide client` processes (SuperNodes) for a few rounds on digits files.

Prints the wall time of the run (server start to server exit), each round's time, and the
memory of a client: idle (SuperNode waiting for work) and while training (with its
ClientApp process), as the sum of the resident memory of all its processes.

    python benchmarks/deployment.py [--rounds 3] [--samples 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from loopback import Session, digits_arrays, drop_file, free_port  # noqa: E402

MIB = 1024 * 1024


def _is_training(pid: int) -> bool:
    try:
        return "flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def sample_memory(session: Session, stop: threading.Event, idle: list[int], training: list[int]) -> None:
    while not stop.wait(0.25):
        pids = session.pids()
        rss = session.rss()
        if rss:
            (training if any(_is_training(p) for p in pids) else idle).append(rss)


def run(rounds: int, samples: int, folder: Path) -> dict:
    from fedtide.cli import main

    certs = folder / "certs"
    main(["certs", "--out", str(certs), "--server-name", "localhost", "--nodes", "2"])
    address = f"127.0.0.1:{free_port()}"
    sessions: list[Session] = []
    stop = threading.Event()
    idle: list[int] = []
    training: list[int] = []
    try:
        started = time.perf_counter()
        server = Session(
            ["server", "--certs", str(certs), "--database", str(folder / "db"), "--out", str(folder / "run"),
             "--address", address, "--num-tasks", "1", "--rounds-per-task", str(rounds), "--local-epochs", "1",
             "--quiet"],
            folder / "server.log", folder,
        )
        sessions.append(server)
        for i in (1, 2):
            drop_file(folder / f"data-{i}", "batch-0.npz", *digits_arrays(seed=i, count=samples))
            sessions.append(Session(
                ["client", "--server", address, "--certs", str(certs), "--node-key", str(certs / f"node-{i}.key"),
                 "--data", str(folder / f"data-{i}"), "--state", str(folder / f"state-{i}")],
                folder / f"client-{i}.log", folder,
            ))
        sampler = threading.Thread(target=sample_memory, args=(sessions[1], stop, idle, training), daemon=True)
        sampler.start()
        code = server.wait(timeout=900)
        wall = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"the server failed (exit {code}):\n{server.output()[-3000:]}")
        time.sleep(2)  # the client goes back to waiting for the next run: its idle memory
    finally:
        stop.set()
        for session in sessions:
            session.kill()
    lines = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "run" / "summary.json").read_text())
    return {
        "rounds": rounds,
        "samples_per_client": samples,
        "wall_seconds": wall,
        "round_seconds": [line["seconds"] for line in lines],
        "final_accuracy": summary["final_task_accuracies"][-1],
        "client_idle_rss_mib": sorted(idle)[len(idle) // 2] / MIB if idle else None,
        "client_training_rss_mib": max(training) / MIB if training else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=300, help="digits samples in each client's data file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedtide-deploy-bench-") as folder:
        result = run(args.rounds, args.samples, Path(folder))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"deployment on loopback: server + 2 clients, TLS + node auth, {args.rounds} rounds")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("wall time, server start to exit (s)", f"{result['wall_seconds']:.1f}")
    table.add_row("round time (s)", ", ".join(f"{s:.1f}" for s in result["round_seconds"]))
    table.add_row("final global accuracy (%)", f"{100 * result['final_accuracy']:.1f}")
    for key, label in (("client_idle_rss_mib", "client RSS idle (MiB)"), ("client_training_rss_mib", "client RSS training (MiB)")):
        table.add_row(label, "n/a" if result[key] is None else f"{result[key]:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
