"""Figures of the tracking part of the operations issue (#17): what watching a run costs.

(a) Tracking off: W1 (benchmarks/speed.py's workload) with this tree against ``--base`` (main
    before the operations work), 5 whole-process runs each, interleaved: median seconds, and
    the ratio (target <= 1.02).
(b) Tracking on: split-MNIST (replay), per round in steady state: the seconds the trackers
    (TensorBoard and MLflow together) spent per round against the round's own time (target
    <= 5%), and whole-process medians of interleaved runs with and without; MLflow's one-time
    store set-up reported on its own.

Usage: python benchmarks/tracking_cost.py --data-dir ../shared/datasets [--base REV] [--repeat 5]
       [--skip-off] [--skip-on] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from speed import w1_flags  # noqa: E402

BASE = "29ebca1"  # main at the end of session 11, before the operations work
SPLIT_MNIST = ["--preset", "split-mnist", "--method", "replay", "--rounds-per-task", "4", "--threads", "1", "--quiet"]


def timed_run(tree: Path, flags: list[str], out: Path, env: dict[str, str]) -> tuple[float, dict]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedtide.cli", "simulate", "--force", "--out", str(out), *flags],
                   cwd=tree, env={**env, "PYTHONPATH": str(tree)}, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, json.loads((out / "summary.json").read_text())


def tracking_off(data_dir: str, base: str, repeat: int, env: dict[str, str], tmp: Path) -> dict:
    tree = tmp / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), base], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        flags = w1_flags(str(Path(data_dir).resolve()), 20) + ["--threads", "1"]
        times: dict[str, list[float]] = {"base": [], "now": []}
        for i in range(repeat):
            for name, where in (("base", tree), ("now", ROOT)):
                seconds, _ = timed_run(where, flags, tmp / f"w1-{name}", env)
                times[name].append(seconds)
                print(f"  W1 {name} run {i + 1}: {seconds:.2f} s", file=sys.stderr)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    base_s, now_s = statistics.median(times["base"]), statistics.median(times["now"])
    return {"base": base, "base_seconds": times["base"], "now_seconds": times["now"], "base_median": base_s,
            "now_median": now_s, "ratio": now_s / base_s}


def tracking_on(data_dir: str, repeat: int, env: dict[str, str], tmp: Path) -> dict:
    flags = SPLIT_MNIST + ["--data-dir", str(Path(data_dir).resolve())]
    walls: dict[str, list[float]] = {"off": [], "on": []}
    shares, setups, per_round = [], [], []
    for i in range(repeat):
        for name, extra in (("off", []), ("on", ["--track", "tensorboard,mlflow"])):
            seconds, summary = timed_run(ROOT, flags + extra, tmp / f"split-{name}-{i}", env)
            walls[name].append(seconds)
            if name == "on":
                spent = sum(v for k, v in summary["watcher_seconds"].items())
                per_round.append(spent / summary["rounds"])
                shares.append(spent / summary["rounds"] / summary["round_seconds"])
                setups.append(summary["tracking_setup_seconds"])
            print(f"  split-MNIST tracking {name} run {i + 1}: {seconds:.2f} s", file=sys.stderr)
    return {"tracker_seconds_per_round": statistics.median(per_round), "share_of_round": statistics.median(shares),
            "setup_seconds": statistics.median(setups), "off_seconds": walls["off"], "on_seconds": walls["on"],
            "wall_ratio": statistics.median(walls["on"]) / statistics.median(walls["off"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-off", action="store_true")
    parser.add_argument("--skip-on", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1"}
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_off:
            result["off"] = tracking_off(args.data_dir, args.base, args.repeat, env, Path(tmp))
        if not args.skip_on:
            result["on"] = tracking_on(args.data_dir, max(args.repeat // 2, 1), env, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if "off" in result:
        off = result["off"]
        print(f"(a) tracking off, W1: {off['now_median']:.2f} s now vs {off['base_median']:.2f} s at {off['base']} "
              f"(median of {len(off['now_seconds'])} interleaved runs): {100 * (off['ratio'] - 1):+.1f}% (target <= +2%)")
    if "on" in result:
        on = result["on"]
        print(f"(b) tracking on (TensorBoard + MLflow), split-MNIST: {1000 * on['tracker_seconds_per_round']:.1f} ms per "
              f"round, {100 * on['share_of_round']:.2f}% of a round (target <= 5%); whole runs {100 * (on['wall_ratio'] - 1):+.1f}% "
              f"(medians); MLflow's store set-up once: {on['setup_seconds']:.1f} s")


if __name__ == "__main__":
    main()
