"""fedtide's start-up cost (issue "Speed II"): what a run costs beyond its rounds and torch.

Runs, interleaved and ``--repeat`` times each, as separate processes:
- ``python -c "import torch"``: the floor every torch program pays;
- ``fedtide simulate`` on the embedded digits with one round of one local epoch, whose summary
  says how long the run itself took (``wall_seconds``: from the run's start to its summary).

Start-up = the whole process minus the run itself (imports, reading the settings and the
data, building the model, and the exit); fedtide's own cost = start-up minus ``import torch``.
Medians are printed. ``--repo DIR`` measures another checkout (e.g. an older commit in a git
worktree) with this interpreter.

Usage: python benchmarks/startup.py [--repeat 5] [--repo DIR] [--json]
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


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--repo", default=str(ROOT))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    env = {**os.environ, "PYTHONPATH": str(repo), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1"}
    torch_s, process_s, run_s = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            torch_s.append(timed([sys.executable, "-c", "import torch"], repo, env))
            out = Path(tmp) / f"run-{i}"
            process_s.append(timed([sys.executable, "-m", "fedtide.cli", "simulate", "--num-tasks", "1",
                                    "--rounds-per-task", "1", "--local-epochs", "1", "--quiet", "--out", str(out)],
                                   repo, env))
            run_s.append(json.loads((out / "summary.json").read_text())["wall_seconds"])
    figures = {
        "repo": str(repo), "repeat": args.repeat,
        "import_torch_s": statistics.median(torch_s),
        "process_s": statistics.median(process_s),
        "run_s": statistics.median(run_s),
    }
    figures["startup_s"] = statistics.median(p - r for p, r in zip(process_s, run_s))
    figures["fedtide_own_s"] = figures["startup_s"] - figures["import_torch_s"]
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{repo} (median of {args.repeat}):")
    for key in ("import_torch_s", "process_s", "run_s", "startup_s", "fedtide_own_s"):
        print(f"  {key:16s} {figures[key]:.3f}")


if __name__ == "__main__":
    sys.exit(main())
