"""Figures of the differential-privacy part of the privacy-and-wire issue (#16): client-level DP.

W1's MLP (784-200-200-10) on MNIST shared by many clients, IID, 10% sampled per round, FedAvg
with 5 local epochs; the non-private run and client-level DP (DP-FedAvg: updates clipped to
--dp-clip, Gaussian noise z * clip on their sum) at several noise multipliers z. Printed per
federation and z: epsilon at delta 1e-5 (Opacus's RDP accountant, Poisson sampling assumed)
and the final accuracy, and the gap to the non-private run (target at 10,000 clients: epsilon
<= 8 within 5 points of a non-private run at >= 85%).

Usage: python benchmarks/privacy.py --data-dir ../shared/datasets [--federations 10000x6,1000x60]
       [--noise 0.7,1.0,1.5] [--rounds 40] [--clip 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.config import RunConfig
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--federations", default="10000x6,1000x60", help="CLIENTSxSAMPLES, comma-separated")
    parser.add_argument("--noise", default="0.7,1.0,1.5")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for federation in args.federations.split(","):
            clients, samples = (int(v) for v in federation.split("x"))
            for noise in [None] + [float(z) for z in args.noise.split(",")]:
                row = run(str(Path(args.data_dir).resolve()), clients, samples, args.rounds, noise, args.clip,
                          Path(tmp) / f"{clients}-{noise}")
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
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
