"""``fedtide export RUN_DIR``: the run's final model as a TorchScript or ONNX file for edge
inference, optionally pruned and int8-quantized, with a table of sizes and accuracy."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fedtide.run_flags import DATA_DIR_ENV

if TYPE_CHECKING:  # torch loads when an export runs, not when the CLI starts
    from common.export import ArtefactStats

FORMATS = ("torchscript", "onnx")  # common.export.FORMATS' keys; a test keeps them equal
QUANTIZATIONS = ("int8",)


def add_parser(commands: Any, methods: bool = True) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to ``commands`` (what ``add_subparsers`` returned)."""
    export = commands.add_parser(
        "export",
        help="write a run's final model as TorchScript or ONNX for edge inference",
        description="Rebuild the model of a run folder from its config.json and model.safetensors, "
        "optionally prune and int8-quantize it, write it as TorchScript (.pt, for torch.jit.load) or "
        "ONNX (.onnx, for onnxruntime), and print its size and test accuracy (on every task's test "
        "set, measured by loading the written file back) beside the original's.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `fedtide simulate`")
    export.add_argument("--format", required=True, choices=FORMATS,
                        help='torchscript (.pt) or onnx (.onnx; needs pip install "fedtide[onnx]")')
    export.add_argument("--prune", type=float, default=0.0, metavar="F",
                        help="zero this fraction of Linear/Conv weights, smallest magnitudes first over "
                        "all layers (0 <= F < 1; default 0: no pruning)")
    export.add_argument("--quantize", choices=QUANTIZATIONS,
                        help="int8: dynamic quantization of Linear weights (about 4x smaller)")
    export.add_argument("--out", metavar="FILE",
                        help="file to write (default: RUN_DIR/model[-prunedNN][-int8].pt|.onnx)")
    export.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    export.add_argument("--data-dir", metavar="DIR",
                        help="folder with the IDX files of mnist / fashion-mnist, to measure accuracy "
                        f"(default: the run's own, then ${DATA_DIR_ENV})")
    return export


def run(args: argparse.Namespace) -> None:
    """Export as ``args`` say and print the table; raises FedtideError for a user's mistake."""
    from rich.console import Console

    from common.export import export_run

    data_dir = args.data_dir or _run_data_dir_fallback(args.run_dir)
    original, exported = export_run(
        Path(args.run_dir), args.format, args.prune, args.quantize, Path(args.out) if args.out else None,
        args.force, data_dir,
    )
    console = Console(width=max(Console().width, 100))
    console.print(export_table([original, exported], title=f"fedtide export: {args.run_dir}"))
    if exported.accuracy is None:
        console.print('accuracy of the .onnx file not measured: pip install "fedtide[onnx]" adds onnxruntime')
    console.print(f"written: {exported.path}")


def _run_data_dir_fallback(run_dir: str) -> str | None:
    """$FEDTIDE_DATA_DIR, used only when the run recorded no data folder of its own."""
    import json

    try:
        recorded = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8")).get("data-dir")
    except (OSError, ValueError, AttributeError):
        return None  # export_run says what is wrong with the folder
    return None if recorded else os.environ.get(DATA_DIR_ENV) or None


def export_table(rows: Sequence["ArtefactStats"], title: str) -> Any:
    """A rich table: one row per artefact with its size, zero weights and accuracy."""
    from rich.table import Table

    table = Table(title=title, caption="test accuracy: over every test sample of every task at once; the run's "
                  "ACC (summary.json) averages the per-task accuracies, each task counting the same, so the two "
                  "differ when the tasks' test sets differ in size")
    table.add_column("model")
    for column in ("bytes", "KiB", "gzip KiB", "zero weights", "test accuracy"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.name, f"{row.size_bytes:,}", f"{row.size_bytes / 1024:.1f}", f"{row.gzip_bytes / 1024:.1f}",
            f"{row.zero_fraction:.1%}", "n/a" if row.accuracy is None else f"{row.accuracy:.4f}",
        )
    return table
