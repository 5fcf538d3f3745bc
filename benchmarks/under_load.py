"""W1 and W2 on a busy machine (issue "Speed II": speed that holds under load).

Runs each workload as its own process, quiet and with one competing busy process
(``python -c 'while 1: pass'``, same nice level) beside it, interleaved, and prints the
whole-process seconds and the ratio busy / quiet (target <= 1.6). With ``--policies`` it also
runs each way under the OpenMP wait policy and thread count given, e.g. to compare fedtide's
default with OpenMP's own (``--policies default,OMP_WAIT_POLICY=ACTIVE``).

W1: MNIST, MLP 200-200, 10 IID clients x 600 samples, 20 rounds, plain SGD (see speed.py).
W2: split-MNIST, 10 clients, Dirichlet alpha 1, replay (200 memories per client), 5 rounds
per task, 1 local epoch, batch 32, SGD lr 0.05, MLP 400-400.

Usage: python benchmarks/under_load.py --data-dir ../shared/datasets [--repeat 3] [--workloads w1,w2]
       [--policies default,OMP_WAIT_POLICY=ACTIVE] [--json]
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

from speed import measure, w1_flags, w2_flags  # noqa: E402

BUSY = [sys.executable, "-c", "while 1: pass"]


def run_once(flags: list[str], out: Path, env: dict[str, str], busy: bool) -> float:
    competitor = subprocess.Popen(BUSY, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if busy else None
    try:
        time.sleep(0.2 if busy else 0)  # the competitor is running before the workload starts
        seconds, _, _ = measure([sys.executable, "-m", "fedtide.cli", "simulate", "--force", "--out", str(out),
                                 *flags], env)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDTIDE_DATA_DIR", ""))
    parser.add_argument("--repeat", type=int, default=3, help="runs of each way; the median is reported")
    parser.add_argument("--workloads", default="w1,w2")
    parser.add_argument("--policies", default="default",
                        help="comma-separated environments to compare: default, or NAME=VALUE[;NAME=VALUE]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.data_dir:
        raise SystemExit("give --data-dir (or FEDTIDE_DATA_DIR): the folder with MNIST's IDX files")
    flags_of = {"w1": w1_flags(args.data_dir, 20), "w2": w2_flags(args.data_dir)}
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in flags_of]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}: choose from w1, w2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):  # each way says its own
            base.pop(name, None)
        for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
            env = dict(base)
            if policy != "default":
                env.update(dict(item.split("=", 1) for item in policy.split(";")))
            for workload in workloads:
                times: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(max(1, args.repeat)):  # interleaved: a slow spell hits both alike
                    for busy in (False, True):
                        times[busy].append(run_once(flags_of[workload], Path(tmp) / workload, env, busy))
                quiet, loaded = statistics.median(times[False]), statistics.median(times[True])
                rows.append({"workload": workload, "policy": policy, "quiet_seconds": quiet, "busy_seconds": loaded,
                             "ratio": loaded / quiet, "quiet_all": times[False], "busy_all": times[True]})
                print(json.dumps(rows[-1]), file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"under load: one busy process beside the run (median of {args.repeat})")
    for column in ("workload", "environment", "quiet s", "busy s", "busy / quiet"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["workload"].upper(), r["policy"], f"{r['quiet_seconds']:.1f}", f"{r['busy_seconds']:.1f}",
                      f"{r['ratio']:.2f}x")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
