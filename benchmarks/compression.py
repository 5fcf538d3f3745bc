"""Figures of the compression part of the privacy-and-wire issue (#16).

Split-MNIST, 10 clients, DER with shifted memories (--replay-shift 2), over seeds: each codec's
ACC and the bytes each client sends up and receives down per round, measured on what is sent
(the arrays of each reply and message). Printed: ACC per codec and seed, its difference to the
uncompressed run, and how many times fewer bytes go up (targets: >= 8x with ACC within 0.5
points).

A codec may name the downlink too, UP/DOWN: ``int4/int8`` sends int4 updates up and the model
packed as int8 down (``--compress-down``).

Usage: python benchmarks/compression.py --data-dir ../shared/datasets [--seeds 3] [--codecs none,int8,int4,int4/int8]
       [--jobs 2] [--json] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overrides import parse_overrides  # noqa: E402


def run_cell(job: tuple[str, int, str, dict]) -> dict:
    from common.config import RunConfig
    from fedtide.presets import preset_settings
    from fedtide.runtimes.inprocess import run_inprocess

    codec, seed, data_dir, overrides = job
    with tempfile.TemporaryDirectory() as tmp:
        up, _, down = codec.partition("/")  # UP[/DOWN]: int4/int8 packs the model the server sends too
        settings = {**preset_settings("split-mnist"), "data_dir": data_dir, "method": "der", "replay_shift": 2,
                    "seed": seed, "compress": up, "compress_down": down or "none", "quiet": True, "out": f"{tmp}/run",
                    **overrides}
        summary = run_inprocess(RunConfig.of(**settings), threads=1)
    return {"codec": codec, "seed": seed, "acc": summary["acc"], "up": summary["uplink_bytes_per_client_round"],
            "down": summary["downlink_bytes_per_client_round"], "rejected": summary["rejected_replies"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--codecs", default="none,int8,int4")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    codecs = args.codecs.split(",")
    jobs = [(codec, seed, str(Path(args.data_dir).resolve()), overrides) for seed in range(args.seeds) for codec in codecs]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(run_cell, jobs)
    by = {(r["codec"], r["seed"]): r for r in rows}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"compressed updates: split-MNIST, 10 clients, DER (shifted memories), {args.seeds} seed(s)")
    for column in ("codec", "ACC % per seed", "ACC % mean", "vs none (points)", "up KB/client/round", "x fewer up",
                   "down KB/client/round"):
        table.add_column(column, justify="left" if column == "codec" else "right")
    for codec in codecs:
        accs = [100 * by[(codec, s)]["acc"] for s in range(args.seeds)]
        diffs = [100 * (by[(codec, s)]["acc"] - by[("none", s)]["acc"]) for s in range(args.seeds)] if "none" in codecs else []
        up = statistics.mean(by[(codec, s)]["up"] for s in range(args.seeds))
        ratio = statistics.mean(by[("none", s)]["up"] / by[(codec, s)]["up"] for s in range(args.seeds)) if "none" in codecs else 1
        table.add_row(codec, " / ".join(f"{a:.2f}" for a in accs), f"{statistics.mean(accs):.2f}",
                      f"{statistics.mean(diffs):+.2f} ({min(diffs):+.2f}..{max(diffs):+.2f})" if diffs else "",
                      f"{up / 1000:.1f}", f"{ratio:.2f}", f"{statistics.mean(by[(codec, s)]['down'] for s in range(args.seeds)) / 1000:.1f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    sys.exit(main())
