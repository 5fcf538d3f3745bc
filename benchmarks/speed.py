"""Workload W1 three ways, plus the 1000-client scale run (issue "Speed and scale").

W1: MNIST, MLP 784-200-200-10, 10 clients x 600 training samples, 20 rounds, FedAvg,
1 local epoch, batch 32, SGD lr 0.05, the global model evaluated on the 10,000 test
images after every round, CPU, seed 0. Each way runs as its own process:
  (a) fedtide's in-process runtime (round clients vectorised when they run plain SGD),
  (b) the same fedtide ServerApp/ClientApp under Flower's simulation engine (Ray),
  (c) a plain sequential PyTorch loop doing the same training (benchmarks/bare_loop.py).
For each: the in-run round time, the whole-process time, the peak RSS of the process and
its children, and the final accuracy.

Scale (--scale 100,1000): N clients sharing MNIST's 60,000 images (60,000/N each), 10%
sampled per round, 20 rounds, in-process runtime: time, round time and peak RSS per N.

Usage: python benchmarks/speed.py --data-dir ../shared/datasets [--json] [--scale 100,1000]
       [--rounds 20] [--skip-flower] [--workers N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedtide.runtimes.flower_processes import process_tree  # noqa: E402


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, from /proc."""
    total = 0
    for current in process_tree(pid):
        try:
            with open(f"/proc/{current}/statm") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(command: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run ``command``; return (whole-process seconds, peak tree RSS bytes, stdout)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss_bytes(process.pid))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{err[-3000:]}")
    return seconds, peak, out


def w1_flags(data_dir: str, rounds: int, clients: int = 10, samples: int = 600) -> list[str]:
    return [
        "--dataset", "mnist", "--data-dir", data_dir, "--num-tasks", "1", "--clients", str(clients),
        "--client-samples", str(samples), "--iid", "--rounds-per-task", str(rounds), "--method", "naive",
        "--hidden", "200,200", "--local-epochs", "1", "--batch-size", "32", "--lr", "0.05",
        "--drift-detector", "none", "--seed", "0", "--quiet",
    ]


def w2_flags(data_dir: str, method: str = "replay", policy: str = "class-balanced", rounds_per_task: int = 5) -> list[str]:
    """W2: split-MNIST, 10 clients, Dirichlet alpha 1, 200 memories per client, 5 rounds per
    task, 1 local epoch, batch 32, SGD lr 0.05, MLP 400-400, seed 0; ``method`` replay or der
    (der with shifted memories, as benchmarks/replay_loop.py --der 0.2 --shift 2)."""
    flags = [
        "--preset", "split-mnist", "--data-dir", data_dir, "--method", method, "--memory-size", "200",
        "--memory-policy", policy, "--rounds-per-task", str(rounds_per_task), "--lr", "0.05", "--hidden", "400,400", "--seed", "0",
        "--quiet",
    ]
    return flags + (["--replay-shift", "2"] if method == "der" else [])


def run_fedtide(flags: list[str], out: Path, env: dict[str, str]) -> dict:
    # --force: each repeat replaces the previous one in the same folder
    seconds, peak, _ = measure([sys.executable, "-m", "fedtide.cli", "simulate", "--force", "--out", str(out), *flags], env)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "round_seconds": summary["round_seconds"], "process_seconds": seconds, "peak_rss_mib": peak / 2**20,
        "final_acc": summary["final_task_accuracies"][0], "phase_seconds": summary["phase_seconds"],
    }


def run_bare(data_dir: str, rounds: int, env: dict[str, str]) -> dict:
    seconds, peak, out = measure(
        [sys.executable, "benchmarks/bare_loop.py", "--data-dir", data_dir, "--rounds", str(rounds)], env
    )
    bare = json.loads(out.strip().splitlines()[-1])
    return {"round_seconds": bare["round_seconds"], "process_seconds": seconds, "peak_rss_mib": peak / 2**20,
            "final_acc": bare["final_acc"]}


def median_of(runs: list[dict]) -> dict:
    """The run with the median whole-process time (timings on a shared machine vary by
    10-30%), with every run's times kept for the record."""
    ordered = sorted(runs, key=lambda r: r["process_seconds"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["process_seconds_all"] = [round(r["process_seconds"], 2) for r in runs]
    chosen["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDTIDE_DATA_DIR", ""))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="fedtide worker processes (1: none; 0: one per core)")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--scale", default="", help="comma-separated client counts for the scale run, e.g. 100,1000")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each way; the median is reported")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.data_dir:
        raise SystemExit("give --data-dir (or FEDTIDE_DATA_DIR): the folder with MNIST's IDX files")
    result: dict = {"workload": "W1", "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "RAY_TMPDIR": str(Path(tmp) / "ray"), "FLWR_HOME": str(Path(tmp) / "flwr")}
        flags = w1_flags(args.data_dir, args.rounds)
        ways = {"a_fedtide_inprocess": lambda: run_fedtide(flags + ["--workers", str(args.workers)], Path(tmp) / "a", env),
                "b_fedtide_flower_engine": lambda: run_fedtide(flags + ["--engine", "flower"], Path(tmp) / "b", env),
                "c_bare_pytorch": lambda: run_bare(args.data_dir, args.rounds, env)}
        if args.skip_flower:
            del ways["b_fedtide_flower_engine"]
        runs: dict[str, list[dict]] = {key: [] for key in ways}
        for _ in range(max(1, args.repeat)):  # interleaved, so that a slow spell hits every way alike
            for key, way in ways.items():
                runs[key].append(way())
        result.update({key: median_of(value) for key, value in runs.items()})
        a, c = result["a_fedtide_inprocess"], result["c_bare_pytorch"]
        ratios = {"a_round_over_c_round": a["round_seconds"] / c["round_seconds"]}
        accs = [a["final_acc"], c["final_acc"]]
        if "b_fedtide_flower_engine" in result:
            b = result["b_fedtide_flower_engine"]
            ratios["b_process_over_a_process"] = b["process_seconds"] / a["process_seconds"]
            accs.append(b["final_acc"])
        ratios["max_acc_difference_points"] = 100 * (max(accs) - min(accs))
        result["figures"] = ratios
        scale = []
        for clients in [int(n) for n in args.scale.split(",") if n.strip()]:
            flags = w1_flags(args.data_dir, args.rounds, clients, 60_000 // clients)
            flags += ["--fraction-train", "0.1", "--workers", str(args.workers)]
            run = run_fedtide(flags, Path(tmp) / f"scale-{clients}", env)
            scale.append({"clients": clients, **run})
        if scale:
            result["scale"] = scale
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"W1 ({args.rounds} rounds)")
    for column in ("run", "in-run round s", "whole process s", "peak RSS MiB", "final acc %"):
        table.add_column(column, justify="right")
    for key, label in (("a_fedtide_inprocess", "(a) fedtide in-process"), ("b_fedtide_flower_engine", "(b) Flower engine"),
                       ("c_bare_pytorch", "(c) bare PyTorch loop")):
        if key in result:
            r = result[key]
            table.add_row(label, f"{r['round_seconds']:.3f}", f"{r['process_seconds']:.1f}",
                          f"{r['peak_rss_mib']:.0f}", f"{100 * r['final_acc']:.2f}")
    console = Console(width=160)
    console.print(table)
    for name, value in result["figures"].items():
        console.print(f"{name}: {value:.3f}")
    phases = result["a_fedtide_inprocess"]["phase_seconds"]
    console.print("(a) phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    if scale:
        table = Table(title="scale: clients sharing MNIST, 10% sampled per round")
        for column in ("clients", "in-run round s", "whole process s", "peak RSS MiB", "final acc %"):
            table.add_column(column, justify="right")
        for r in scale:
            table.add_row(str(r["clients"]), f"{r['round_seconds']:.3f}", f"{r['process_seconds']:.1f}",
                          f"{r['peak_rss_mib']:.0f}", f"{100 * r['final_acc']:.2f}")
        console.print(table)


if __name__ == "__main__":
    main()
