"""Kill-and-resume figures: a simulation killed with SIGKILL mid-run and resumed with
`fedtide simulate --resume` ends with the weights of the same run left alone.

Runs the simulation uninterrupted; then the same run as a process that is killed (SIGKILL,
its whole process group) once the checkpoint of round --kill-after exists; then
`fedtide simulate --resume` on its folder. Prints the largest absolute difference between
the two final models, the rounds completed before the kill, and the rounds redone and lost
(a finished round whose metrics.jsonl line changed was redone: its timing would differ; one
that is missing was lost).

    python benchmarks/resume.py [--kill-after 5] [--data-dir DIR] [--json]

Without --data-dir: the digits default (5 tasks x 8 rounds, no download). With it: split-MNIST
(10 clients), 2 rounds per task.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def simulate(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fedtide.cli", "simulate", *args]


def run_timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def kill_after(command: list[str], run_dir: Path, rounds: int, timeout: float = 600) -> int:
    """Start ``command``, SIGKILL its process group once round ``rounds`` is checkpointed;
    return the newest checkpointed round at the kill."""
    from server.checkpoint import CheckpointStore

    store = CheckpointStore(run_dir)
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not store.rounds() or store.rounds()[0] < rounds:
            if process.poll() is not None:
                raise SystemExit(f"the run ended (exit {process.returncode}) before round {rounds}: lower --kill-after")
            if time.monotonic() > deadline:
                raise SystemExit(f"round {rounds} not reached within {timeout:.0f} s")
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return store.rounds()[0]


def max_abs_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    if list(sorted(wa)) != list(sorted(wb)):
        return float("inf")
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def measure(settings: list[str], kill_round: int, folder: Path) -> dict:
    whole, killed = folder / "whole", folder / "killed"
    whole_seconds = run_timed(simulate([*settings, "--out", str(whole)]))
    checkpointed = kill_after(simulate([*settings, "--out", str(killed)]), killed, kill_round)
    before = (killed / "metrics.jsonl").read_text().splitlines()
    resume_seconds = run_timed(simulate(["--resume", str(killed), "--quiet"]))
    after = (killed / "metrics.jsonl").read_text().splitlines()
    total = len((whole / "metrics.jsonl").read_text().splitlines())
    after_rounds = [json.loads(line)["round"] for line in after]
    by_round = {json.loads(line)["round"]: line for line in after}
    completed = [json.loads(line)["round"] for line in before]
    return {
        "settings": " ".join(settings),
        "rounds": total,
        "rounds_completed_before_kill": len(completed),
        "checkpointed_round_at_kill": checkpointed,
        "rounds_redone": sum(1 for r, line in zip(completed, before) if r in by_round and by_round[r] != line),
        "rounds_lost": sum(1 for r in range(1, total + 1) if r not in by_round),
        "rounds_in_metrics_after_resume": len(after_rounds),
        "metrics_rounds_in_order": after_rounds == list(range(1, total + 1)),
        "max_abs_weight_difference": max_abs_difference(whole / "model.safetensors", killed / "model.safetensors"),
        "uninterrupted_seconds": round(whole_seconds, 1),
        "resume_seconds": round(resume_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after", type=int, default=5, help="kill once this round is checkpointed (default 5)")
    parser.add_argument("--data-dir", help="MNIST IDX folder: split-MNIST instead of digits")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.data_dir:
        settings = ["--preset", "split-mnist", "--data-dir", args.data_dir, "--rounds-per-task", "2", "--quiet"]
    else:
        settings = ["--quiet"]
    with tempfile.TemporaryDirectory(prefix="fedtide-resume-") as tmp:
        result = measure(settings, args.kill_after, Path(tmp))
    ok = result["max_abs_weight_difference"] <= 1e-6 and result["rounds_redone"] == 0 and result["rounds_lost"] == 0
    result["ok"] = ok and result["metrics_rounds_in_order"]
    if args.json:
        print(json.dumps(result))
        return
    print(f"simulate {result['settings']}: {result['rounds']} rounds")
    print(f"  rounds completed before SIGKILL   {result['rounds_completed_before_kill']}"
          f" (newest checkpoint: round {result['checkpointed_round_at_kill']})")
    print(f"  rounds redone / lost              {result['rounds_redone']} / {result['rounds_lost']}")
    print(f"  max |weights - uninterrupted|     {result['max_abs_weight_difference']:.3g}")
    print(f"  uninterrupted run / resume, s     {result['uninterrupted_seconds']} / {result['resume_seconds']}")
    print("  OK" if result["ok"] else "  FAILED")


if __name__ == "__main__":
    main()
