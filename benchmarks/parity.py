"""Same results before and after a refactor: fixed-seed runs, their weights' hash and figures.

Runs (each as its own `fedtide simulate` process, seed 0):
  default      `fedtide simulate` as the README's first command runs it
  der-mnist    split-MNIST with der (the preset), 2 rounds per task to keep it short
  w1           workload W1 (benchmarks/speed.py's flags), vectorised in-process
  ewc-prox     split-digits with replay+ewc and a FedProx term, fedadam server step
  fedavgm      split-digits with lwf, fedavgm and drift reactions

For each it prints the sha256 of the final weights' values (each tensor's name, dtype, shape
and bytes, in name order: the safetensors file itself is not byte-stable, its header's
metadata order varies from process to process) and the summary's ACC, BWT, FWT and final
accuracies. `--save FILE` writes them as JSON; `--compare FILE` checks that every run
gives bit-exact the same weights and figures as the saved ones and exits 1 otherwise.

Usage: python benchmarks/parity.py --data-dir ../shared/datasets [--save F | --compare F] [--only NAMES]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import w1_flags  # noqa: E402


def runs(data_dir: str) -> dict[str, list[str]]:
    return {
        "default": [],
        "der-mnist": ["--preset", "split-mnist", "--data-dir", data_dir, "--method", "der", "--rounds-per-task", "2"],
        "w1": w1_flags(data_dir, 20),
        "ewc-prox": ["--preset", "split-digits", "--method", "replay+ewc", "--prox-mu", "0.01",
                     "--strategy", "fedadam", "--rounds-per-task", "3"],
        "fedavgm": ["--preset", "split-digits", "--method", "lwf", "--strategy", "fedavgm", "--rounds-per-task", "3",
                    "--async-spread", "2", "--react-extra-epochs", "1", "--drift-weight", "2", "--react-server"],
    }


def measure(name: str, flags: list[str], folder: Path) -> dict:
    out = folder / name
    command = [sys.executable, "-m", "fedtide.cli", "simulate", *flags, "--out", str(out), "--quiet"]
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "weights_sha256": weights_digest(out / "model.safetensors"),
        "acc": summary["acc"], "bwt": summary["bwt"], "fwt": summary["fwt"],
        "final_task_accuracies": summary["final_task_accuracies"],
    }


def weights_digest(path: Path) -> str:
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for name, array in sorted(load_file(str(path)).items()):
        digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--save")
    parser.add_argument("--compare")
    parser.add_argument("--only", default="", help="comma-separated run names")
    args = parser.parse_args()
    chosen = runs(args.data_dir)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in chosen.items():
            results[name] = measure(name, flags, Path(tmp))
            r = results[name]
            print(f"{name:10s} sha256 {r['weights_sha256'][:16]}  ACC {100 * r['acc']:.4f}  BWT {100 * r['bwt']:+.4f}"
                  f"  FWT {100 * r['fwt']:+.4f}", flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1))
    if args.compare:
        saved = json.loads(Path(args.compare).read_text())
        differ = [name for name in results if saved.get(name) != results[name]]
        print("bit-exact: all runs agree" if not differ else f"DIFFERENT: {', '.join(differ)}")
        raise SystemExit(1 if differ else 0)


if __name__ == "__main__":
    main()
