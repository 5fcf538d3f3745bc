"""Figures of the secure-aggregation part of the privacy-and-wire issue (#16).

Split-MNIST (preset: 10 clients, Dirichlet 1, replay, 10 rounds a task), each mode over
seeds, in fedtide's in-process runtime: ACC, the seconds a round takes (whole rounds: the
protocol's four stages, training, aggregation, evaluation), and the bytes each client
receives and sends per round (arrays, keys, key shares and masked vectors as sent, no
framing). ``plain`` is the default run; ``fedavg`` the same without the influence bound
(``--norm-cap 0 --weight-cap 0 --norm-outlier 0``), which secure aggregation cannot apply;
``secure`` runs SecAgg+ (``--secure-aggregation``) and is compared with ``fedavg``; ``dp`` and
``secure+dp`` add client-level DP (noise on the sum, seeded for a like-for-like comparison).
The gap column is the largest difference of any weight after round 1 against the compared
run: for ``secure``, quantisation and nothing else (that one-round run fixes
``--secure-max-weight 16384``, above every client's count, so that no count is cut).

Usage: python benchmarks/secure_aggregation.py --data-dir ../shared/datasets [--seeds 1]
       [--modes plain,fedavg,secure,dp,secure+dp] [--jobs 2] [--json] [--set KEY=VALUE ...]
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

UNBOUNDED = {"norm_cap": 0.0, "weight_cap": 0.0, "norm_outlier": 0.0}  # what secure aggregation cannot apply
MODES = {
    "plain": {},
    "fedavg": UNBOUNDED,
    "secure": {"secure_aggregation": True},
    "dp": {"dp": "client", "dp_noise": 0.3, "dp_clip": 5.0, "dp_reproducible": True},
    "secure+dp": {"secure_aggregation": True, "dp": "client", "dp_noise": 0.3, "dp_clip": 5.0, "dp_reproducible": True},
}
FIRST_ROUND_MAX_WEIGHT = 16384  # above every split-MNIST client's first-round count (up to ~11,000)
BASE = {"secure": "fedavg", "fedavg": "plain", "secure+dp": "dp"}


def run_cell(job: tuple[str, int, str, dict, int]) -> dict:
    import numpy as np
    from safetensors.numpy import load_file

    from common.config import RunConfig
    from fedtide.presets import preset_settings
    from fedtide.runtimes.inprocess import run_inprocess

    mode, seed, data_dir, overrides, rounds = job
    with tempfile.TemporaryDirectory() as tmp:
        settings = {**preset_settings("split-mnist"), "data_dir": data_dir, "seed": seed, "quiet": True, **MODES[mode],
                    **overrides}
        one = {**settings, "num_tasks": 1, "rounds_per_task": 1, "out": f"{tmp}/one"}
        if one.get("secure_aggregation") and not one.get("dp") == "client":
            one["secure_max_weight"] = FIRST_ROUND_MAX_WEIGHT  # no client cut: the gap is quantisation alone
        first = run_inprocess(RunConfig.of(**one), threads=1)
        weights = {k: v.astype(np.float64) for k, v in load_file(f"{tmp}/one/model.safetensors").items()}
        if rounds:
            settings["rounds_per_task"] = rounds
        summary = run_inprocess(RunConfig.of(**settings, out=f"{tmp}/run"), threads=1)
    secure = summary.get("secure_aggregation")
    return {
        "mode": mode, "seed": seed, "acc": summary["acc"], "round_seconds": summary["round_seconds"],
        "down": secure["bytes_down_per_client_round"] if secure else summary["downlink_bytes_per_client_round"],
        "up": secure["bytes_up_per_client_round"] if secure else summary["uplink_bytes_per_client_round"],
        "failed_rounds": secure["failed_rounds"] if secure else 0, "epsilon": summary.get("dp", {}).get("epsilon"),
        "first_round": {k: v.tolist() for k, v in weights.items()}, "first_acc": first["acc"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--modes", default="plain,secure")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per task (0: the preset's)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    import numpy as np

    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}: choose from {', '.join(MODES)}")
    overrides = parse_overrides(args.set)
    jobs = [(mode, seed, str(Path(args.data_dir).resolve()), overrides, args.rounds)
            for seed in range(args.seeds) for mode in modes]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(run_cell, jobs)
    by = {(r["mode"], r["seed"]): r for r in rows}
    for row in rows:
        base = by.get((BASE.get(row["mode"], ""), row["seed"]))
        row["gap"] = (max(float(np.abs(np.asarray(row["first_round"][k]) - np.asarray(base["first_round"][k])).max())
                          for k in row["first_round"]) if base else None)
    for row in rows:
        row.pop("first_round")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"secure aggregation (SecAgg+): split-MNIST, 10 clients, replay, {args.seeds} seed(s)")
    for column in ("mode", "ACC % mean", "vs without (points)", "round s", "x round time", "down KB/client/round",
                   "up KB/client/round", "x bytes up", "weight gap after round 1", "failed rounds", "epsilon"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    seeds = range(args.seeds)
    for mode in modes:
        cells = [by[(mode, s)] for s in seeds]
        base = [by.get((BASE.get(mode, ""), s)) for s in seeds]
        compared = all(b is not None for b in base)
        mean = lambda key, rs=cells: statistics.mean(r[key] for r in rs)  # noqa: E731
        table.add_row(
            mode, f"{100 * mean('acc'):.2f}",
            f"{100 * (mean('acc') - mean('acc', base)):+.2f}" if compared else "",
            f"{mean('round_seconds'):.3f}", f"{mean('round_seconds') / mean('round_seconds', base):.2f}" if compared else "",
            f"{mean('down') / 1000:.1f}", f"{mean('up') / 1000:.1f}",
            f"{mean('up') / mean('up', base):.2f}" if compared else "",
            f"{max(r['gap'] for r in cells):.1e}" if compared else "", str(sum(r["failed_rounds"] for r in cells)),
            f"{mean('epsilon'):.2f}" if cells[0]["epsilon"] is not None else "",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    sys.exit(main())
