"""Bytes on the wire against the bench's figure (privacy-and-wire issue, #16).

A real `fedtide server` (SuperLink, TLS, node authentication) and two `fedtide client`
processes on loopback, each client connected through its own counting TCP relay
(``tests/loopback.CountingRelay``): what it counts is everything on the wire between that
client and the server, TLS records, HTTP/2 and gRPC framing, polls and heartbeats included.
Per codec (``--compress``), the steady-state bytes per client per round up and down (the
counts between the end of round 1 and the end of the last round, over those rounds: start-up,
registration and the app bundle's download are left out) beside the run's
``uplink_bytes_per_client_round`` / ``downlink_bytes_per_client_round`` (the arrays each reply
and message carries, what `fedtide bench` reports), and how far apart they are (target: within 5%).

    python benchmarks/wire_bytes.py [--data-dir ../shared/datasets] [--codecs none,int8,int4] [--rounds 8]
        [--samples 300] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from loopback import CountingRelay, Session, digits_arrays, drop_file, free_port, wait_for  # noqa: E402

from fedtide.deployment.wire_meter import EMPTY_POLL, ENV  # noqa: E402

UPDATE_UP = ("PushMessages", "PushObject")  # the reply: its message, then its objects
MESSAGE_DOWN = ("PullMessages", "PullObject")  # the instruction: a poll that found it, then its objects


def _rounds_done(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def client_arrays(seed: int, samples: int, data_dir: str | None):
    """Digits (8x8), or with ``data_dir`` MNIST images (28x28, uint8) for W1's MLP."""
    if not data_dir:
        return digits_arrays(seed=seed, count=samples)
    import numpy as np

    from common.image_datasets import load_dataset

    train = load_dataset("mnist", data_dir).train
    pick = np.random.default_rng(seed).permutation(len(train))[:samples]
    return (train.x[pick].numpy() * 255).round().astype(np.uint8), train.y[pick].numpy()


def measure(codec: str, rounds: int, samples: int, folder: Path, data_dir: str | None = None) -> dict:
    from fedtide.cli import main

    certs = folder / "certs"
    main(["certs", "--out", str(certs), "--server-name", "localhost", "--nodes", "2"])
    address, run = f"127.0.0.1:{free_port()}", folder / "run"
    relays = [CountingRelay(address) for _ in range(2)]
    sessions: list[Session] = []
    marks: dict[int, list[tuple[int, int]]] = {}
    calls: dict[int, list[dict[str, dict[str, int]]]] = {}
    try:
        server = Session(
            ["server", "--certs", str(certs), "--database", str(folder / "db"), "--out", str(run), "--address", address,
             "--num-tasks", "1", "--rounds-per-task", str(rounds), "--local-epochs", "1", "--compress", codec,
             "--release", "manual", "--round-timeout", "120", "--quiet",
             *(["--dataset", "mnist", "--data-dir", data_dir] if data_dir else [])],
            folder / "server.log", folder,
        )
        sessions.append(server)
        for i, relay in enumerate(relays, start=1):
            drop_file(folder / f"data-{i}", "batch-0.npz", *client_arrays(i, samples, data_dir))
            sessions.append(Session(
                ["client", "--server", relay.address, "--certs", str(certs), "--node-key", str(certs / f"node-{i}.key"),
                 "--data", str(folder / f"data-{i}"), "--state", str(folder / f"state-{i}")],
                folder / f"client-{i}.log", folder, env={ENV: str(folder / f"wire-{i}.json")},
            ))
        for done in (1, rounds):  # the counts when round 1 ends and when the last one does
            wait_for(lambda: _rounds_done(run) >= done, 600, f"round {done}", every=0.05)
            marks[done] = [relay.counts() for relay in relays]
            calls[done] = [json.loads((folder / f"wire-{i}.json").read_text()) for i in (1, 2)]
        if server.wait(timeout=300) != 0:
            raise SystemExit(f"the server failed:\n{server.output()[-3000:]}")
    finally:
        for session in sessions:
            session.kill()
        for relay in relays:
            relay.close()
    summary = json.loads((run / "summary.json").read_text())
    span = (rounds - 1) * len(relays)
    up = sum(last[0] - first[0] for first, last in zip(marks[1], marks[rounds])) / span
    down = sum(last[1] - first[1] for first, last in zip(marks[1], marks[rounds])) / span
    def between(rpcs: tuple[str, ...] | None, way: str) -> float:
        total = 0
        for first, last in zip(calls[1], calls[rounds]):
            for rpc, entry in last.items():
                if rpcs is None or rpc in rpcs:
                    total += entry[way] - first.get(rpc, {}).get(way, 0)
        return total / span

    every_up, every_down = between(None, "up"), between(None, "down")
    reply_up, message_down = between(UPDATE_UP, "up"), between(MESSAGE_DOWN, "down")
    polls = sum(last.get(EMPTY_POLL, {}).get("calls", 0) - first.get(EMPTY_POLL, {}).get("calls", 0)
                for first, last in zip(calls[1], calls[rounds])) / span
    return {
        "codec": codec, "rounds": rounds, "http_reply_up": reply_up, "http_message_down": message_down,
        "http_other": every_up + every_down - reply_up - message_down, "empty_polls": polls,
        "round_seconds": sum(line["seconds"] for line in
                             map(json.loads, (run / "metrics.jsonl").read_text().splitlines()[1:])) / (rounds - 1),
        "bench_up": summary["uplink_bytes_per_client_round"], "wire_up": up,
        "bench_down": summary["downlink_bytes_per_client_round"], "wire_down": down,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", default="none,int8,int4")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--samples", type=int, default=300, help="digits samples in each client's data file")
    parser.add_argument("--data-dir", help="MNIST's IDX files: the compression bench's model (MLP 784-128-128-10, 473 KB), "
                        "instead of digits and the default MLP")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="print each run's per-call counts of client 1")
    args = parser.parse_args()
    rows = []
    for codec in args.codecs.split(","):
        with tempfile.TemporaryDirectory(prefix="fedtide-wire-") as folder:
            rows.append(measure(codec, args.rounds, args.samples, Path(folder),
                                str(Path(args.data_dir).resolve()) if args.data_dir else None))
            if args.keep:
                print((Path(folder) / "wire-1.json").read_text(), file=sys.stderr)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bytes per client per round on loopback (TLS, node auth, 2 clients, rounds 2-{args.rounds})")
    for column in ("codec", "bench: up", "reply on the wire (HTTP)", "vs bench", "bench: down",
                   "instruction on the wire (HTTP)", "vs bench", "other calls (polls, heartbeats)",
                   "TLS connection up / down"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["codec"], f"{row['bench_up'] / 1000:.1f} KB", f"{row['http_reply_up'] / 1000:.1f} KB",
            f"{100 * (row['http_reply_up'] / row['bench_up'] - 1):+.1f}%", f"{row['bench_down'] / 1000:.1f} KB",
            f"{row['http_message_down'] / 1000:.1f} KB", f"{100 * (row['http_message_down'] / row['bench_down'] - 1):+.1f}%",
            f"{row['http_other'] / 1000:.1f} KB ({row['empty_polls']:.0f} empty polls, round {row['round_seconds']:.1f} s)",
            f"{row['wire_up'] / 1000:.1f} / {row['wire_down'] / 1000:.1f} KB")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
