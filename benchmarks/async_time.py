"""Buffered asynchronous aggregation against synchronous rounds, in simulated time (issue #19, part 3).

The preset ``fedbuff-split-mnist``: split-MNIST, 20 clients whose speeds are log-normal with
the slowest 10x slower than the fastest; tasks switch at simulated times (every
``--rounds-per-task`` virtual rounds, a virtual round being the slowest client's time).

- **sync**: rounds that sample 10 clients and wait for all of them;
- **async**: FedBuff, 10 clients in flight at all times, an update every 5 replies,
  staleness-weighted.

Both run the same simulated time per task. The async run is then repeated with every task
shortened (``--shorter``: the rounds per task of each shorter run); the time async needs
to reach the sync run's final ACC is the total time of the shortest of its runs whose final
ACC is at least the sync run's. Prints per seed and the means: final ACC, simulated
seconds, model updates, wall time; the speed-up (sync time / async time to the same ACC)
and async's ACC minus sync's at equal time.

Usage: python benchmarks/async_time.py --data-dir ../shared/datasets [--seeds 3] [--jobs 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common.config import RunConfig  # noqa: E402
from fedtide.presets import preset_settings  # noqa: E402


def run(name: str, settings: dict, out: str) -> dict:
    import torch

    from fedtide.runtimes.inprocess import run_inprocess

    torch.set_num_threads(1)
    summary = run_inprocess(RunConfig.of(**settings, out=out, quiet=True))
    return {"name": name, "rounds_per_task": settings["rounds_per_task"], "seed": settings["seed"],
            "acc": summary["acc"], "seconds": summary["simulated_seconds"], "updates": summary["model_updates"],
            "wall": summary["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDTIDE_DATA_DIR", ""))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--rounds-per-task", type=int, default=10, help="virtual rounds per task of the sync run")
    parser.add_argument("--shorter", default="5,4,3", help="rounds per task of the shorter async runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = {**preset_settings("fedbuff-split-mnist"), "data_dir": args.data_dir}
    shorter = [int(r) for r in args.shorter.split(",") if r.strip()]
    jobs = []
    for seed in range(args.seeds):
        common = {**base, "seed": seed}
        jobs.append(("sync", {**common, "buffer_size": 0, "rounds_per_task": args.rounds_per_task}))
        for rounds in [args.rounds_per_task, *shorter]:
            jobs.append(("async", {**common, "rounds_per_task": rounds}))
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run, name, settings, str(Path(tmp) / f"{name}-{i}")) for i, (name, settings) in enumerate(jobs)]
        results = [f.result() for f in futures]

    per_seed = []
    for seed in range(args.seeds):
        sync = next(r for r in results if r["seed"] == seed and r["name"] == "sync")
        runs = sorted((r for r in results if r["seed"] == seed and r["name"] == "async"), key=lambda r: r["seconds"])
        same_time = next(r for r in runs if r["rounds_per_task"] == args.rounds_per_task)
        reaching = next((r for r in runs if r["acc"] >= sync["acc"]), None)
        per_seed.append({
            "seed": seed, "sync": sync, "async": runs,
            "acc_gap_points": 100 * (same_time["acc"] - sync["acc"]),
            "speedup": sync["seconds"] / reaching["seconds"] if reaching else None,
            "async_seconds_to_sync_acc": reaching["seconds"] if reaching else None,
        })
    speedups = [s["speedup"] for s in per_seed if s["speedup"] is not None]
    means = {
        "sync_acc": sum(s["sync"]["acc"] for s in per_seed) / len(per_seed),
        "acc_gap_points": sum(s["acc_gap_points"] for s in per_seed) / len(per_seed),
        "speedup_min": min(speedups) if speedups else None,
        "speedup_mean": sum(speedups) / len(speedups) if speedups else None,
    }
    if args.json:
        print(json.dumps({"seeds": per_seed, "means": means}, indent=2))
        return
    table = Table(title="fedbuff-split-mnist: FedBuff against synchronous rounds, simulated time")
    for column in ("seed", "run", "rounds/task", "ACC %", "simulated s", "model updates", "wall s"):
        table.add_column(column, justify="right")
    for s in per_seed:
        for r in [s["sync"], *s["async"]]:
            table.add_row(str(s["seed"]), r["name"], str(r["rounds_per_task"]), f"{100 * r['acc']:.2f}",
                          f"{r['seconds']:.0f}", str(r["updates"]), f"{r['wall']:.0f}")
    console = Console()
    console.print(table)
    for s in per_seed:
        speed = f"{s['speedup']:.2f}x" if s["speedup"] else "not reached"
        console.print(f"seed {s['seed']}: async at equal time {s['acc_gap_points']:+.2f} points; "
                      f"time to the sync run's final ACC {speed} shorter")
    speedups = (f"min {means['speedup_min']:.2f}x, mean {means['speedup_mean']:.2f}x" if means["speedup_min"]
                else "not reached")
    console.print(f"mean: sync ACC {100 * means['sync_acc']:.2f} %, async at equal time {means['acc_gap_points']:+.2f} "
                  f"points; speed-up to the sync ACC: {speedups}")


if __name__ == "__main__":
    main()
