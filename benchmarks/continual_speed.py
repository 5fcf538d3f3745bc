"""The figures of issue "Speed II" in one run: continual learning as fast as plain SGD, speed
that holds under load, 10,000 clients.

Each way runs as its own process (whole-process seconds, peak RSS of the process tree),
the ways interleaved and repeated ``--repeat`` times (the median reported):

W2 (replay) and W2-der (dark experience replay with memories shifted up to 2 pixels), both
with a reservoir memory filled when a task ends, the memory policy of the plain loop:
  (a) fedtide in-process, a round's clients trained in one batched computation,
  (b) the same run client by client (``--no-vectorize``): the accuracy reference,
  (c) the same app under Flower's simulation engine (Ray),
  (d) the plain PyTorch loop (benchmarks/replay_loop.py, ``--der 0.2 --shift 2`` for der).
  Targets: (a) <= 0.6x (d); (c) >= 3x (a); ACC of (a) within 0.5 points of (b).
Under load: W1 and W2, quiet and beside one ``python -c 'while 1: pass'``. Target: <= 1.6x.
Scale: N clients sharing MNIST (60,000 / N samples each), 1% sampled per round (at least 2),
20 rounds, replay. Target: 10,000 clients in <= 2 GiB peak RSS.
Floor (benchmarks/compute_floor.py): the seconds W2's matrix products alone take on this CPU,
plus a bare ``import torch`` process: the least fedtide's W2 can take here, over the plain loop.

Usage: python benchmarks/continual_speed.py --data-dir ../shared/datasets [--repeat 1] [--json]
       [--parts w2,der,load,scale,floor] [--scale 100,1000,10000] [--skip-flower]
       [--rounds-per-task 5] [--scale-rounds 20] (smaller: a quick check, not the figures)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import measure, median_of, run_fedtide, w1_flags, w2_flags  # noqa: E402
from under_load import run_once  # noqa: E402

TARGETS = {"a_over_d": 0.6, "c_over_a": 3.0, "acc_gap_points": 0.5, "busy_over_quiet": 1.6, "rss_10000_mib": 2048}


def run_plain(data_dir: str, method: str, rounds_per_task: int, env: dict[str, str]) -> dict:
    extra = ["--der", "0.2", "--shift", "2"] if method == "der" else []
    seconds, peak, out = measure([sys.executable, "benchmarks/replay_loop.py", "--data-dir", data_dir,
                                  "--rounds-per-task", str(rounds_per_task), *extra], env)
    loop = json.loads(out.strip().splitlines()[-1])
    return {"process_seconds": seconds, "peak_rss_mib": peak / 2**20, "acc": loop["acc"]}


def run_app(flags: list[str], out: Path, env: dict[str, str]) -> dict:
    run = run_fedtide(flags, out, env)
    run["acc"] = json.loads((out / "summary.json").read_text())["acc"]
    return run


def workload(method: str, data_dir: str, tmp: Path, env: dict[str, str], repeat: int, flower: bool,
             rounds_per_task: int) -> dict:
    flags = w2_flags(data_dir, method, policy="reservoir", rounds_per_task=rounds_per_task)
    # Ray's processes take a few seconds to go after (c); (b) runs next, so that they never
    # share the machine with the plain loop, whose spinning OpenMP threads slow 1.5x beside them
    ways = {
        "a_fedtide": lambda: run_app(flags, tmp / f"{method}-a", env),
        "c_flower_engine": lambda: run_app(flags + ["--engine", "flower"], tmp / f"{method}-c", env),
        "b_client_by_client": lambda: run_app(flags + ["--no-vectorize"], tmp / f"{method}-b", env),
        "d_plain_loop": lambda: run_plain(data_dir, method, rounds_per_task, env),
    }
    if not flower:
        del ways["c_flower_engine"]
    runs: dict[str, list[dict]] = {key: [] for key in ways}
    for _ in range(max(1, repeat)):  # interleaved: a slow spell hits every way alike
        for key, way in ways.items():
            runs[key].append(way())
            print(f"{method} {key}: {runs[key][-1]['process_seconds']:.1f} s", file=sys.stderr, flush=True)
    result = {key: median_of(value) for key, value in runs.items()}
    a, b, d = result["a_fedtide"], result["b_client_by_client"], result["d_plain_loop"]
    figures = {"a_over_d": a["process_seconds"] / d["process_seconds"],
               "a_over_b": a["process_seconds"] / b["process_seconds"],
               "acc_gap_points": 100 * abs(a["acc"] - b["acc"])}
    if "c_flower_engine" in result:
        figures["c_over_a"] = result["c_flower_engine"]["process_seconds"] / a["process_seconds"]
    return {"ways": result, "figures": figures}


def compute_floor(data_dir: str, rounds_per_task: int, env: dict[str, str], w2: dict | None) -> dict:
    """W2's compute floor (its own process, so that its threads are fedtide's choice) and a bare
    ``import torch`` process; with W2's figures, the floor over the plain loop."""
    _, _, out = measure([sys.executable, str(ROOT / "benchmarks" / "compute_floor.py"), "--data-dir", data_dir,
                         "--rounds-per-task", str(rounds_per_task), "--json"], env)
    floor = json.loads(out)
    floor["import_torch_seconds"] = statistics.median(
        measure([sys.executable, "-c", "import torch"], env)[0] for _ in range(3))
    floor["least_process_seconds"] = floor["floor_seconds"] + floor["import_torch_seconds"]
    if w2 is not None:
        floor["least_over_d"] = floor["least_process_seconds"] / w2["ways"]["d_plain_loop"]["process_seconds"]
        floor["a_over_least"] = w2["ways"]["a_fedtide"]["process_seconds"] / floor["least_process_seconds"]
    print(f"floor: {floor['least_process_seconds']:.1f} s", file=sys.stderr, flush=True)
    return floor


def under_load(data_dir: str, tmp: Path, env: dict[str, str], repeat: int) -> list[dict]:
    rows = []
    for name, flags in (("W1", w1_flags(data_dir, 20)), ("W2", w2_flags(data_dir))):
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(max(1, repeat)):
            for busy in (False, True):
                times[busy].append(run_once(flags, tmp / f"load-{name}", env, busy))
                print(f"{name} {'busy' if busy else 'quiet'}: {times[busy][-1]:.1f} s", file=sys.stderr, flush=True)
        quiet, loaded = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"workload": name, "quiet_seconds": quiet, "busy_seconds": loaded, "busy_over_quiet": loaded / quiet})
    return rows


def scale(data_dir: str, counts: list[int], rounds: int, tmp: Path, env: dict[str, str]) -> list[dict]:
    rows = []
    for clients in counts:
        flags = w1_flags(data_dir, rounds, clients, 60_000 // clients)
        flags[flags.index("--method") + 1] = "replay"
        flags += ["--fraction-train", str(max(0.01, 2 / clients))]
        run = run_fedtide(flags, tmp / f"scale-{clients}", env)
        rows.append({"clients": clients, "samples_each": 60_000 // clients, **run})
        print(f"scale {clients}: {run['process_seconds']:.1f} s, {run['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDTIDE_DATA_DIR", ""))
    parser.add_argument("--repeat", type=int, default=1, help="runs of each way; the median is reported")
    parser.add_argument("--parts", default="w2,der,load,scale,floor")
    parser.add_argument("--scale", default="100,1000,10000", help="client counts for the scale run")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument("--rounds-per-task", type=int, default=5, help="W2's rounds per task (5: the workload)")
    parser.add_argument("--scale-rounds", type=int, default=20, help="rounds of the scale runs (20: the figure)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.data_dir:
        raise SystemExit("give --data-dir (or FEDTIDE_DATA_DIR): the folder with MNIST's IDX files")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"w2", "der", "load", "scale", "floor"}
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}: choose from w2, der, load, scale, floor")
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_TMPDIR": str(tmp / "ray"),
               "FLWR_HOME": str(tmp / "flwr")}
        for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):  # fedtide chooses its own; the plain loop torch's
            env.pop(name, None)
        for method, key in (("replay", "w2"), ("der", "der")):
            if key in parts:
                result[key] = workload(method, args.data_dir, tmp, env, args.repeat, not args.skip_flower,
                                       args.rounds_per_task)
        if "load" in parts:
            result["under_load"] = under_load(args.data_dir, tmp, env, args.repeat)
        if "scale" in parts:
            counts = [int(n) for n in args.scale.split(",") if n.strip()]
            result["scale"] = scale(args.data_dir, counts, args.scale_rounds, tmp, env)
        if "floor" in parts:
            result["floor"] = compute_floor(args.data_dir, args.rounds_per_task, env, result.get("w2"))
    result["targets"] = TARGETS
    if args.json:
        print(json.dumps(result, indent=2))
        return
    report(result)


def report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    labels = {"a_fedtide": "(a) fedtide, batched", "b_client_by_client": "(b) fedtide, client by client",
              "c_flower_engine": "(c) Flower simulation engine", "d_plain_loop": "(d) plain PyTorch loop"}
    for key, title in (("w2", "W2: split-MNIST, replay"), ("der", "W2 with der, shifted memories")):
        if key not in result:
            continue
        table = Table(title=title)
        for column in ("way", "whole process s", "peak RSS MiB", "ACC %"):
            table.add_column(column, justify="right")
        for way, r in sorted(result[key]["ways"].items()):
            table.add_row(labels[way], f"{r['process_seconds']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{100 * r['acc']:.2f}")
        console.print(table)
        figures = result[key]["figures"]
        console.print("  " + ", ".join(f"{name} {value:.2f}" for name, value in figures.items())
                      + f"  (targets: a_over_d <= {TARGETS['a_over_d']}, c_over_a >= {TARGETS['c_over_a']}, "
                        f"acc_gap_points <= {TARGETS['acc_gap_points']})")
    if "under_load" in result:
        table = Table(title="under load: one busy process beside the run")
        for column in ("workload", "quiet s", "busy s", "busy / quiet"):
            table.add_column(column, justify="right")
        for r in result["under_load"]:
            table.add_row(r["workload"], f"{r['quiet_seconds']:.1f}", f"{r['busy_seconds']:.1f}",
                          f"{r['busy_over_quiet']:.2f}x")
        console.print(table)
    if "scale" in result:
        table = Table(title="scale: clients sharing MNIST, 1% sampled per round, 20 rounds, replay")
        for column in ("clients", "samples each", "whole process s", "in-run round s", "peak RSS MiB", "final acc %"):
            table.add_column(column, justify="right")
        for r in result["scale"]:
            table.add_row(str(r["clients"]), str(r["samples_each"]), f"{r['process_seconds']:.1f}",
                          f"{r['round_seconds']:.3f}", f"{r['peak_rss_mib']:.0f}", f"{100 * r['final_acc']:.2f}")
        console.print(table)
    if "floor" in result:
        f = result["floor"]
        console.print(
            f"floor: W2's products take {f['train_tflop']:.2f} TFLOP at {f['train_gflops']:.0f} GFLOPS (training) + "
            f"{f['test_tflop']:.2f} TFLOP at {f['test_gflops']:.0f} GFLOPS (testing) = {f['floor_seconds']:.1f} s on "
            f"{f['threads']} thread(s); with a bare import torch ({f['import_torch_seconds']:.1f} s), "
            f"{f['least_process_seconds']:.1f} s"
            + (f" = {f['least_over_d']:.2f}x the plain loop; fedtide (a) takes {f['a_over_least']:.2f}x that"
               if "least_over_d" in f else ""))


if __name__ == "__main__":
    main()
