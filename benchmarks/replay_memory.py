"""Which replay memory keeps the past (issue 19, part 1).

Runs workload W2 (split-MNIST, 10 clients, Dirichlet alpha 1, memory 200 per client, 5
rounds per task, 1 local epoch, batch 32, SGD lr 0.05, MLP 400-400) with each memory policy
(``--memory-policy`` reservoir | class-balanced) and fill (``--memory-fill`` stream |
boundary), beside the plain PyTorch loop of ``benchmarks/replay_loop.py`` (a reservoir
filled when a task ends), over several seeds. With ``--der`` it also runs ``der`` with
shifted memories (``--replay-shift 2``) with the old memory (reservoir, stream) and the new
default; with ``--rotated`` replay on rotated-MNIST (domain-incremental: no new labels, so
only a drift detection marks the boundary), old memory against the new default.

Prints a table per row (ACC %, BWT points, seconds) and the means over seeds; ``--json``
prints them as JSON instead.

Usage: python benchmarks/replay_memory.py --data-dir ../shared/datasets [--seeds 3] [--jobs 2] [--der] [--rotated]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

# row name -> (scenario, method, settings); "loop" is the plain loop
OLD = {"memory_policy": "reservoir", "memory_fill": "stream"}
POLICY_ROWS = {
    "reservoir, stream (before)": ("split", "replay", OLD),
    "reservoir, boundary": ("split", "replay", {"memory_policy": "reservoir", "memory_fill": "boundary"}),
    "class-balanced, stream": ("split", "replay", {"memory_policy": "class-balanced", "memory_fill": "stream"}),
    "class-balanced, boundary (default)": ("split", "replay", {}),
    "plain loop, filled at task end": ("split", "loop", {}),
}
DER_ROWS = {
    "der shift 2, reservoir, stream (before)": ("split", "der", {**OLD, "replay_shift": 2}),
    "der shift 2, default memory": ("split", "der", {"replay_shift": 2}),
}
ROTATED_ROWS = {
    "rotated replay, reservoir, stream (before)": ("rotated", "replay", OLD),
    "rotated replay, default memory": ("rotated", "replay", {}),
}


def run_cell(cell: tuple[str, str, str, dict, int, str]) -> dict:
    row, scenario, method, changes, seed, data_dir = cell
    import torch

    torch.set_num_threads(1)  # one core per cell: two cells never fight over the same two threads
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from replay_loop import run_loop, w2_config

    config = w2_config(data_dir, seed)
    if scenario == "rotated":
        config = config.replace(scenario="domain-incremental", domain_transform="rotation")
    if method == "loop":
        result = run_loop(config)
        return {"row": row, "seed": seed, "acc": result["acc"], "bwt": result["bwt"], "seconds": result["seconds"]}
    from fedtide.runtimes.inprocess import run_inprocess

    with tempfile.TemporaryDirectory() as tmp:
        summary = run_inprocess(config.replace(method=method, out=str(Path(tmp) / "run"), quiet=True, **changes))
    return {"row": row, "seed": seed, "acc": summary["acc"], "bwt": summary["bwt"], "seconds": summary["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDTIDE_DATA_DIR", ""))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one core each")
    parser.add_argument("--der", action="store_true", help="also der with shifted memories, old memory and new")
    parser.add_argument("--rotated", action="store_true", help="also replay on rotated-MNIST, old memory and new")
    parser.add_argument("--rows", default="", help="comma-separated row names to run (default: all chosen)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.data_dir:
        raise SystemExit("give --data-dir (the folder holding mnist/), or set FEDTIDE_DATA_DIR")
    rows = {**POLICY_ROWS, **(DER_ROWS if args.der else {}), **(ROTATED_ROWS if args.rotated else {})}
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",")]
        rows = {name: spec for name, spec in rows.items() if any(name.startswith(w) for w in wanted)}
    cells = [(name, *spec, seed, args.data_dir) for name, spec in rows.items() for seed in range(args.seeds)]
    results = []
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(run_cell, cells):
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
    means = []
    for name in rows:
        mine = [r for r in results if r["row"] == name]
        accs = [100 * r["acc"] for r in mine]
        means.append({"row": name, "acc": statistics.mean(accs), "acc_std": statistics.pstdev(accs),
                      "bwt": statistics.mean(100 * r["bwt"] for r in mine),
                      "seconds": statistics.mean(r["seconds"] for r in mine),
                      "acc_per_seed": [round(a, 2) for a in accs]})
    if args.json:
        print(json.dumps({"results": results, "means": means}, indent=2))
        return
    table = Table(title=f"replay memory on W2 (split-MNIST, 10 clients, memory 200), {args.seeds} seed(s)")
    for column in ("memory", "ACC %", "per seed", "BWT pts", "s per run"):
        table.add_column(column, justify="right" if column != "memory" else "left")
    for m in means:
        table.add_row(m["row"], f"{m['acc']:.2f} ± {m['acc_std']:.2f}", " / ".join(f"{a:.2f}" for a in m["acc_per_seed"]),
                      f"{m['bwt']:+.2f}", f"{m['seconds']:.0f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
