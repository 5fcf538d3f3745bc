"""Sizes and test accuracy of a run's model exported for the edge (`fedtide export`).

Trains one run (MNIST by default: class-incremental, 5 tasks, 5 clients, replay; shortened
by the flags below), or takes an existing run folder, then exports its final model as
TorchScript (plain, pruned 50%, int8, pruned 50% + int8) and ONNX (plain, pruned 50% + int8)
and prints each file's size and its accuracy on the union of all tasks' test sets, measured by
loading the written file back (torch.jit.load / onnxruntime).

Usage: python benchmarks/export.py --data-dir ../shared/datasets [--dataset mnist]
       [--rounds-per-task 2] [--client-samples 2000] [--local-epochs 2] [--run-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import RunConfig  # noqa: E402
from common.export import export_run  # noqa: E402

VARIANTS = [  # (format, prune, quantize)
    ("torchscript", 0.0, None),
    ("torchscript", 0.5, None),
    ("torchscript", 0.0, "int8"),
    ("torchscript", 0.5, "int8"),
    ("onnx", 0.0, None),
    ("onnx", 0.5, "int8"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="", help="folder with the IDX files of mnist")
    parser.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or digits")
    parser.add_argument("--rounds-per-task", type=int, default=2)
    parser.add_argument("--client-samples", type=int, default=2000)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--run-dir", help="export this existing run folder instead of training one")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedtide-export-") as scratch:
        run_dir = Path(args.run_dir) if args.run_dir else Path(scratch) / "run"
        if not args.run_dir:
            from fedtide.runtimes.inprocess import run_inprocess

            config = RunConfig.of(
                dataset=args.dataset, data_dir=args.data_dir, rounds_per_task=args.rounds_per_task,
                client_samples=args.client_samples, local_epochs=args.local_epochs, out=str(run_dir), quiet=True,
            )
            started = time.perf_counter()
            run_inprocess(config)
            print(f"trained {run_dir} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rows = []
        for fmt, prune, quantize in VARIANTS:
            original, exported = export_run(
                run_dir, fmt, prune, quantize, Path(scratch) / f"export-{len(rows)}", force=True,
                data_dir=args.data_dir or None,
            )
            rows.append(exported)
        rows.insert(0, original)
    if args.json:
        print(json.dumps([{**asdict(r), "path": str(r.path)} for r in rows], indent=2))
        return
    from rich.console import Console

    from fedtide.export_command import export_table

    title = f"fedtide export: {args.run_dir or args.dataset}, accuracy on all tasks' test sets"
    Console(width=100).print(export_table(rows, title))


if __name__ == "__main__":
    main()
