"""Figures of the differential-privacy part of the privacy-and-wire issue (#16).

Client-level DP (``--part client``): W1's MLP (784-200-200-10) on MNIST shared by many clients,
IID, 10% sampled per round, FedAvg with 5 local epochs; the non-private run and DP-FedAvg
(updates clipped to --dp-clip, Gaussian noise z * clip on their sum) at several noise
multipliers z. Printed per federation and z: epsilon at delta 1e-5 (Opacus's RDP accountant,
Poisson sampling assumed), the final accuracy and the gap to the non-private run (target at
10,000 clients: epsilon <= 8 within 5 points of a non-private run at >= 85%).

Sample-level DP (``--part sample``): split-MNIST (the preset: 10 clients, Dirichlet alpha 1,
10 rounds per task, batch 32) with replay and the same MLP; the non-private run and DP-SGD on
every client (each sample's gradient clipped to 1, noise z) at several z, per replay memory
size: a memory is drawn at rate replay-ratio * batch / memories at every step, so a small
memory costs more budget. Printed: the largest epsilon any client reached, ACC and the gap.

Usage: python benchmarks/privacy.py --data-dir ../shared/datasets [--part client|sample|all]
       [--federations 10000x6,1000x60] [--noise 0.7,1.0,1.5] [--rounds 40] [--clip 1.0]
       [--sample-memory 1000,200] [--sample-noise 1.0,1.5,3.0] [--jobs 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.config import RunConfig
from fedtide.presets import preset_settings
from fedtide.runtimes.inprocess import run_inprocess


def run(data_dir: str, clients: int, samples: int, rounds: int, noise: float | None, clip: float, out: Path) -> dict:
    settings = dict(
        dataset="mnist", data_dir=data_dir, num_tasks=1, clients=clients, client_samples=samples, iid=True,
        rounds_per_task=rounds, fraction_train=0.1, method="naive", hidden="200,200", local_epochs=5,
        batch_size=min(samples, 16), lr=0.1, drift_detector="none", quiet=True, out=str(out), release="manual",
    )
    if noise is not None:
        settings.update(dp="client", dp_noise=noise, dp_clip=clip, dp_delta=1e-5)
    started = time.perf_counter()
    summary = run_inprocess(RunConfig.of(**settings), threads=2)
    return {"clients": clients, "samples": samples, "noise": noise, "acc": summary["acc"],
            "epsilon": (summary.get("dp") or {}).get("epsilon"), "clipped": (summary.get("dp") or {}).get("clipped_updates"),
            "seconds": time.perf_counter() - started}


def run_sample(data_dir: str, memory: int, noise: float | None, clip: float, out: str) -> dict:
    settings = {**preset_settings("split-mnist"), "data_dir": data_dir, "method": "replay", "memory_size": memory,
                "hidden": "200,200", "quiet": True, "out": out, "release": "manual"}
    if noise is not None:
        settings.update(dp="sample", dp_noise=noise, dp_clip=clip, dp_delta=1e-5)
    started = time.perf_counter()
    summary = run_inprocess(RunConfig.of(**settings), threads=1)
    return {"part": "sample", "memory": memory, "noise": noise, "acc": summary["acc"],
            "epsilon": (summary.get("dp") or {}).get("epsilon"), "seconds": time.perf_counter() - started}


def sample_table(rows: list[dict], clip: float) -> Table:
    table = Table(title=f"sample-level DP (DP-SGD): split-MNIST, 10 clients, replay, MLP 784-200-200-10, clip {clip:g}, "
                  "delta 1e-5, the largest client's epsilon")
    for column in ("memories per client", "noise z", "epsilon", "ACC %", "vs non-private (points)", "wall s"):
        table.add_column(column, justify="right")
    for row in rows:
        base = next((r for r in rows if r["memory"] == row["memory"] and r["noise"] is None), None)
        table.add_row(str(row["memory"]), "non-private" if row["noise"] is None else f"{row['noise']:g}",
                      "inf" if row["epsilon"] is None else f"{row['epsilon']:.2f}", f"{100 * row['acc']:.2f}",
                      "" if row["noise"] is None or base is None else f"{100 * (row['acc'] - base['acc']):+.2f}",
                      f"{row['seconds']:.0f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--federations", default="10000x6,1000x60", help="CLIENTSxSAMPLES, comma-separated")
    parser.add_argument("--noise", default="0.7,1.0,1.5")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--part", choices=("client", "sample", "all"), default="all")
    parser.add_argument("--sample-memory", default="1000,200", help="replay memories per client, comma-separated")
    parser.add_argument("--sample-noise", default="1.0,1.5,3.0")
    parser.add_argument("--jobs", type=int, default=1, help="sample-level runs at once (one thread each)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows, sample_rows = [], []
    data_dir = str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("sample", "all"):
            cells = [(memory, noise) for memory in (int(m) for m in args.sample_memory.split(","))
                     for noise in [None] + [float(z) for z in args.sample_noise.split(",")]]
            with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                futures = [pool.submit(run_sample, data_dir, memory, noise, args.clip, f"{tmp}/sample-{memory}-{noise}")
                           for memory, noise in cells]
                for future in futures:
                    sample_rows.append(future.result())
                    print(json.dumps(sample_rows[-1]), file=sys.stderr, flush=True)
        for federation in (args.federations.split(",") if args.part in ("client", "all") else []):
            clients, samples = (int(v) for v in federation.split("x"))
            for noise in [None] + [float(z) for z in args.noise.split(",")]:
                row = run(data_dir, clients, samples, args.rounds, noise, args.clip, Path(tmp) / f"{clients}-{noise}")
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows + sample_rows, indent=2))
        return
    if sample_rows:
        Console(width=120).print(sample_table(sample_rows, args.clip))
    if not rows:
        return
    table = Table(title=f"client-level DP: MNIST, MLP 784-200-200-10, 10% of clients a round, {args.rounds} rounds, "
                  f"clip {args.clip:g}, delta 1e-5")
    for column in ("clients x samples", "noise z", "epsilon", "ACC %", "vs non-private (points)"):
        table.add_column(column, justify="right")
    for row in rows:
        base = next(r for r in rows if r["clients"] == row["clients"] and r["noise"] is None)
        table.add_row(f"{row['clients']:,} x {row['samples']}", "non-private" if row["noise"] is None else f"{row['noise']:g}",
                      "inf" if row["epsilon"] is None else f"{row['epsilon']:.2f}", f"{100 * row['acc']:.2f}",
                      "" if row["noise"] is None else f"{100 * (row['acc'] - base['acc']):+.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
