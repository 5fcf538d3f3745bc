"""Figures of the foundation issue, from one command:

- wall time of the default ``fedtide simulate`` run (in-process runtime);
- ACC / BWT / FWT / forgetting of ``naive`` and ``replay`` on the default scenario;
- parity of Flower's simulation engine with the in-process runtime (same seed).

Usage: python benchmarks/foundation.py [--json] [--seed N] [--skip-flower]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], out: Path) -> tuple[dict, float]:
    """Run ``fedtide simulate`` as a user would; return its summary and whole-process seconds."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fedtide.cli", "simulate", "--quiet", "--out", str(out), *args],
        check=True, cwd=ROOT, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return json.loads((out / "summary.json").read_text()), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-flower", action="store_true", help="skip the Flower-engine parity run")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("RAY_TMPDIR", str(Path(tmp) / "ray"))
        runs = [("naive", "inprocess"), ("replay", "inprocess")]
        if not args.skip_flower:
            runs.append(("replay", "flower"))
        for method, engine in runs:
            summary, seconds = run_cli(
                ["--method", method, "--engine", engine, "--seed", str(args.seed)], Path(tmp) / f"{method}-{engine}"
            )
            rows.append({
                "method": method, "engine": engine, "acc": summary["acc"], "bwt": summary["bwt"],
                "fwt": summary["fwt"], "forgetting": summary["forgetting"],
                "in_run_seconds": summary["wall_seconds"], "process_seconds": seconds,
            })
    result = {"seed": args.seed, "runs": rows}
    if not args.skip_flower:
        result["engine_acc_difference_points"] = 100 * abs(rows[2]["acc"] - rows[1]["acc"])
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"fedtide foundation figures (default digits scenario, seed {args.seed})")
    for column in ("method", "engine", "ACC %", "BWT pts", "FWT pts", "forgetting pts", "in-run s", "process s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["method"], r["engine"], f"{100 * r['acc']:.2f}", f"{100 * r['bwt']:+.2f}",
                      f"{100 * r['fwt']:+.2f}", f"{100 * r['forgetting']:.2f}",
                      f"{r['in_run_seconds']:.1f}", f"{r['process_seconds']:.1f}")
    Console().print(table)
    if "engine_acc_difference_points" in result:
        Console().print(f"flower engine vs in-process ACC difference: {result['engine_acc_difference_points']:.2f} points")


if __name__ == "__main__":
    main()
