"""``fedtide predict --state DIR FILE``: predictions of the released model an edge client keeps.

The model is the one in the client's state folder (``client.released_model``), checked
against its sha256 before use; the file is read with the inbox's limits and checks
(``client.inbox_files``: ``.npz`` with ``x``, ``.csv`` with one column per feature), labels
optional (given, the accuracy is printed too). ``--serve ADDR`` answers the same over HTTP on
the device instead: ``POST /predict`` with the file's bytes.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

MAX_BODY = 64 * 2**20  # the inbox's largest file


def add_parser(commands: Any, methods: bool = True) -> argparse.ArgumentParser:
    predict = commands.add_parser(
        "predict", help="predict with the released model an edge client keeps",
        description="Predict the classes of the samples in FILE (.npz with array x, or .csv with one column per "
        "feature; labels optional: y / a 'label' column, then the accuracy is printed) with the released model kept "
        "in an edge client's state folder. Predictions go to stdout as CSV (index,prediction) or to --out.",
    )
    predict.add_argument("file", nargs="?", metavar="FILE", help=".npz or .csv file of samples")
    predict.add_argument("--state", required=True, metavar="DIR", help="the client's state folder (fedtide client --state)")
    predict.add_argument("--out", metavar="FILE", help="write the predictions here: .csv (index,prediction) or .npz "
                         "(arrays prediction and version)")
    predict.add_argument("--feature-range", metavar="LOW,HIGH", help="values the samples may hold (default: the "
                         "client's default, 0,1 for images)")
    predict.add_argument("--stats", action="store_true", help="print, per released version, how it did on the labelled "
                         "data that arrived while the device held it")
    predict.add_argument("--serve", metavar="HOST:PORT", help="answer POST /predict (the file's bytes; header "
                         "X-Filename: name.npz|name.csv) over HTTP instead; GET /model says the version")
    return predict


def run(args: argparse.Namespace) -> None:
    from client.feature_range import DEFAULT_FEATURE_RANGE, parse_feature_range
    from client.released_model import ReleasedModelStore
    from common.errors import FedtideError

    store = ReleasedModelStore(Path(args.state))
    if not Path(args.state).is_dir():
        raise FedtideError(f"--state {args.state}: no such folder; give the folder of `fedtide client --state`")
    feature_range = parse_feature_range(args.feature_range) if args.feature_range else DEFAULT_FEATURE_RANGE
    if args.stats:
        print_stats(store)
        if not args.file and not args.serve:
            return
    if args.serve:
        from fedtide.predict_server import serve

        serve(args.serve, store, feature_range)
        return
    released = store.load()
    if not args.file:
        raise FedtideError("give a FILE of samples to predict (or --serve HOST:PORT, or --stats)")
    path = Path(args.file)
    if not path.is_file():
        raise FedtideError(f"{path}: no such file; give an .npz (array x) or .csv file of samples")
    if path.stat().st_size > MAX_BODY:
        raise FedtideError(f"{path} is larger than {MAX_BODY // 2**20} MiB: split it into several files")
    result = predict_bytes(released, path.name, path.read_bytes(), feature_range)
    summary = (f"released model version {released.version} (sha256 {released.sha256[:12]}): "
               f"{len(result['predictions'])} samples")
    if result["accuracy"] is not None:
        summary += f", accuracy {100 * result['accuracy']:.2f}% on the file's labels"
    print(summary, file=sys.stderr)
    write_predictions(result["predictions"], released.version, Path(args.out) if args.out else None)


def predict_bytes(released: Any, name: str, raw: bytes, feature_range: tuple[float, float]) -> dict[str, Any]:
    """Predictions (and accuracy, when the file has labels) of one file's bytes; FedtideError
    naming what is wrong with the file."""
    from client.inbox_files import BadFile, parse_inputs
    from client.released_model import predict
    from common.errors import FedtideError

    try:
        x, y = parse_inputs(name, raw, released.input_shape, released.num_classes, feature_range)
    except BadFile as err:
        raise FedtideError(f"{name[:80]}: {err}") from None
    predictions = predict(released.model, x)
    accuracy = None if y is None else float((predictions == y).float().mean())
    return {"version": released.version, "sha256": released.sha256, "predictions": predictions.tolist(),
            "accuracy": accuracy}


def write_predictions(predictions: list[int], version: int, out: Path | None) -> None:
    from common.errors import FedtideError
    from common.files import write_bytes_atomic, write_text_atomic

    text = "index,prediction\n" + "".join(f"{i},{p}\n" for i, p in enumerate(predictions))
    if out is None:
        sys.stdout.write(text)
        return
    if out.suffix not in (".csv", ".npz"):
        raise FedtideError(f"--out {out}: name a .csv or .npz file")
    try:
        if out.suffix == ".csv":
            write_text_atomic(out, text)
        else:
            import numpy as np

            buffer = io.BytesIO()
            np.savez(buffer, prediction=np.array(predictions, dtype=np.int64), version=np.array(version))
            write_bytes_atomic(out, buffer.getvalue())
    except OSError as err:
        raise FedtideError(f"--out {out}: cannot write there ({err.strerror or err}): choose a writable file") from None
    print(f"written: {out}", file=sys.stderr)


def print_stats(store: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    stats = store.stats()
    table = Table(title=f"released models on this device: {store.folder}")
    for column in ("version", "labelled samples seen", "predicted right", "accuracy %"):
        table.add_column(column, justify="right")
    for version, entry in sorted(stats.items(), key=lambda item: int(item[0])):
        accuracy = 100 * entry["correct"] / entry["seen"] if entry["seen"] else float("nan")
        table.add_row(version, str(entry["seen"]), str(entry["correct"]), f"{accuracy:.2f}")
    held = store.held_version()
    table.caption = f"held now: version {held}" if held else "no released model held yet"
    Console(stderr=True).print(table)

