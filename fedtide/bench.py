"""``fedtide bench``: several methods and three references on the same splits, over seeds.

Each (method or reference, seed) is a cell: one full in-process run with its own run
folder under ``OUT/cells``. A finished cell leaves ``cell.json``; re-running the same
bench skips cells whose ``cell.json`` holds the same settings, so an interrupted bench
resumes where it stopped. The table is written as CSV, Markdown and a plot.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.config import RunConfig
from common.errors import FedtideError
from common.method_registry import MethodSettings
from common.files import write_json_atomic, write_text_atomic

REFERENCES = ("local-only", "fed-joint", "central-joint")
TRAININGS = ("federated", "clustered", "cluster-oracle", "personal-head")  # each method is run these ways

# (column title, summary key or function, scale, format)
COLUMNS: list[tuple[str, Callable[[dict], float | None], float, str]] = [
    ("ACC %", lambda s: s["acc"], 100, "{:.2f}"),
    ("served acc %", lambda s: s.get("served_acc"), 100, "{:.2f}"),
    ("BWT pts", lambda s: s["bwt"], 100, "{:+.2f}"),
    ("FWT pts", lambda s: s["fwt"], 100, "{:+.2f}"),
    ("forgetting pts", lambda s: s["forgetting"], 100, "{:.2f}"),
    ("final preq. acc %", lambda s: s["final_prequential_acc"], 100, "{:.2f}"),
    ("rounds to recover", lambda s: s["rounds_to_recover"], 1, "{:.1f}"),
    ("client rounds to recover", lambda s: s.get("client_rounds_to_recover"), 1, "{:.2f}"),
    ("drift detected %", lambda s: s["drift_detection"]["detection_rate"] if s["drift_detection"]["switches"] else None, 100, "{:.0f}"),
    ("detection delay (rounds)", lambda s: s["drift_detection"]["mean_delay_rounds"] if s["drift_detection"]["detected"] else None, 1, "{:.2f}"),
    ("drift detected within 2 rounds %", lambda s: s["drift_detection"].get("detection_rate_within_2") if s["drift_detection"]["switches"] else None, 100, "{:.0f}"),
    ("false alarms", lambda s: s["drift_detection"]["false_alarms"], 1, "{:.1f}"),
    ("false alarms /100 client-rounds", lambda s: s["drift_detection"].get("false_alarms_per_100"), 1, "{:.2f}"),
    ("detection precision %", lambda s: s["drift_detection"].get("precision"), 100, "{:.0f}"),
    ("epsilon (--dp)", lambda s: (s.get("dp") or {}).get("epsilon"), 1, "{:.2f}"),
    # measured on the arrays each reply and message carries (--compress shrinks the first)
    ("KB up/client/round", lambda s: s.get("uplink_bytes_per_client_round"), 1 / 1000, "{:.1f}"),
    ("KB down/client/round", lambda s: s.get("downlink_bytes_per_client_round"), 1 / 1000, "{:.1f}"),
    ("wall s", lambda s: s["wall_seconds"], 1, "{:.1f}"),
]


@dataclass(frozen=True)
class Cell:
    label: str
    seed: int
    config: RunConfig

    @property
    def name(self) -> str:
        return f"{self.label.replace('+', '_').replace('/', '-')}-s{self.seed}"


def build_cells(
    base: RunConfig, methods: list[str], seeds: int, references: list[str], reference_method: str, out: Path,
    options: dict[str, Any] | None = None, trainings: list[str] | None = None,
) -> list[Cell]:
    """Every method (each way of ``trainings``: a label ``method/training`` beside plain
    federated), then every reference, for each seed; all cells of a seed share its splits.
    ``options``: method settings for the cells whose methods read them."""
    cells = []
    for seed in range(seeds):
        for method in methods:
            for training in trainings or ["federated"]:
                label = method if training == "federated" else f"{method}/{training}"
                config = with_method(base, method, options).replace(seed=seed, training=training)
                cells.append(Cell(label, seed, config))
        for reference in references:
            cells.append(Cell(reference, seed, _reference(base, reference, reference_method, options).replace(seed=seed)))
    # a cell keeps one released model's weights, not --keep-releases of them: a bench has many cells
    return [Cell(c.label, c.seed, c.config.replace(out=str(out / "cells" / c.name), quiet=True, keep_releases=1))
            for c in cells]


def with_method(base: RunConfig, method: str, options: dict[str, Any] | None = None) -> RunConfig:
    """``base`` running ``method``, with those of ``options`` (method settings by flag name,
    e.g. from ``--set``) that its methods read. A cell keeps the defaults of the settings its
    method does not read, so it neither fails validation (--memory-size with naive) nor
    reruns when they change."""
    return dataclasses.replace(base, methods=MethodSettings(method, {**base.methods.given, **(options or {})}))


def _reference(base: RunConfig, reference: str, reference_method: str, options: dict[str, Any] | None) -> RunConfig:
    if base.server.buffer_size:  # a reference trains in rounds: no asynchronous aggregation
        base = base.replace(buffer_size=0, concurrency=0)
    if reference == "local-only":
        # no server, so no server reactions; a client's own reactions stay as configured
        return with_method(base, reference_method, options).replace(training="local-only", react_server=False, drift_weight=1.0)
    # no drift, so no reactions
    joint = with_method(base, "naive").replace(
        training="joint", react_server=False, react_lr_boost=1.0, react_extra_epochs=0, drift_weight=1.0
    )
    if reference == "central-joint":
        return joint.replace(clients=1, iid=True, fraction_train=1.0)
    return joint


def _run_cell(cell: Cell, threads: int) -> dict[str, Any]:
    from fedtide.runtimes.inprocess import run_inprocess

    summary = run_inprocess(cell.config, threads=threads)
    record = {"label": cell.label, "seed": cell.seed, "config": cell.config.to_mapping(), "summary": summary}
    write_json_atomic(Path(cell.config.run.out) / "cell.json", record)
    return record


def finished(cell: Cell) -> dict[str, Any] | None:
    path = Path(cell.config.run.out) / "cell.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    try:  # compared as settings, not as text: a cell written before a new setting existed still counts
        same = RunConfig.from_mapping(record.get("config") or {}) == cell.config
    except FedtideError:
        return None
    return record if same else None


def run_bench(cells: list[Cell], jobs: int, on_done: Callable[[Cell, bool], None],
              threads: int | None = None) -> list[dict[str, Any]]:
    """Run the cells not finished yet (``jobs`` at a time, each with ``threads`` torch threads:
    by default the cores divided among the jobs); return every cell's record, in order."""
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for cell in cells:
        done = finished(cell)
        if done is not None:
            records[cell.name] = done
            on_done(cell, True)
        else:
            todo.append(cell)
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    if jobs <= 1:
        for cell in todo:
            records[cell.name] = _run_cell(cell, threads)
            on_done(cell, False)
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {cell.name: (cell, pool.submit(_run_cell, cell, threads)) for cell in todo}
            for name, (cell, future) in futures.items():
                records[name] = future.result()
                on_done(cell, False)
    return [records[c.name] for c in cells]


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per label: mean and std over seeds of every column."""
    labels = list(dict.fromkeys(r["label"] for r in records))
    rows = []
    for label in labels:
        summaries = [r["summary"] for r in records if r["label"] == label]
        row: dict[str, Any] = {"label": label, "seeds": len(summaries)}
        for title, get, scale, _ in COLUMNS:
            values = [get(s) for s in summaries]
            values = [v * scale for v in values if v is not None]
            row[title] = (_mean(values), _std(values)) if values else (None, None)
        rows.append(row)
    return rows


def reference_gaps(rows: list[dict[str, Any]]) -> list[str]:
    """One line per joint reference in ``rows``: how far the best method's mean ACC is below it.
    The methods are the rows that are not references (local-only is a baseline, not a bound)."""
    lines = _oracle_gaps(rows)
    methods = [r for r in rows if r["label"] not in REFERENCES and r["ACC %"][0] is not None]
    if not methods:
        return lines
    best = max(methods, key=lambda r: r["ACC %"][0])
    for reference in ("fed-joint", "central-joint"):
        ref = next((r for r in rows if r["label"] == reference and r["ACC %"][0] is not None), None)
        if ref is not None:
            gap = ref["ACC %"][0] - best["ACC %"][0]
            lines.append(
                f"best method {best['label']}: ACC {best['ACC %'][0]:.2f} %, "
                f"{abs(gap):.2f} points {'below' if gap >= 0 else 'above'} {reference} ({ref['ACC %'][0]:.2f} %)"
            )
    return lines


def _oracle_gaps(rows: list[dict[str, Any]]) -> list[str]:
    """One line per method trained both clustered and with the cluster oracle: how far the
    clustered run's served accuracy is from the oracle's."""
    served = {r["label"]: r["served acc %"][0] for r in rows if r["served acc %"][0] is not None}
    lines = []
    for label, oracle in served.items():
        if label.endswith("/cluster-oracle") and (clustered := label.replace("/cluster-oracle", "/clustered")) in served:
            gap = oracle - served[clustered]
            lines.append(f"{clustered}: served accuracy {served[clustered]:.2f} %, {abs(gap):.2f} points "
                         f"{'below' if gap >= 0 else 'above'} {label} ({oracle:.2f} %)")
    return lines


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def format_cell(value: tuple[float | None, float | None], fmt: str, seeds: int) -> str:
    mean, std = value
    if mean is None:
        return "-"
    return fmt.format(mean) + (f" ± {std:.2f}" if seeds > 1 else "")


def write_outputs(out: Path, records: list[dict[str, Any]], rows: list[dict[str, Any]], title: str) -> None:
    per_cell = io.StringIO()
    writer = csv.writer(per_cell)
    writer.writerow(["label", "seed"] + [c[0] for c in COLUMNS])
    for r in records:
        values = [get(r["summary"]) for _, get, _, _ in COLUMNS]
        writer.writerow([r["label"], r["seed"]] + ["" if v is None else v * c[2] for v, c in zip(values, COLUMNS)])
    write_text_atomic(out / "cells.csv", per_cell.getvalue())

    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["label", "seeds"] + [f"{c[0]} {k}" for c in COLUMNS for k in ("mean", "std")])
    for row in rows:
        writer.writerow([row["label"], row["seeds"]] + [
            "" if v is None else v for c in COLUMNS for v in row[c[0]]
        ])
    write_text_atomic(out / "summary.csv", table.getvalue())

    md = [f"# {title}", "", "| method | " + " | ".join(c[0] for c in COLUMNS) + " |",
          "|---|" + "---|" * len(COLUMNS)]
    for row in rows:
        md.append(f"| {row['label']} | " + " | ".join(format_cell(row[c[0]], c[3], row["seeds"]) for c in COLUMNS) + " |")
    gaps = reference_gaps(rows)
    if gaps:
        md += [""] + [f"- {line}" for line in gaps]
    write_text_atomic(out / "summary.md", "\n".join(md) + "\n")
    write_json_atomic(out / "summary.json", {"title": title, "rows": rows})
    _plot(out / "summary.svg", rows, title)


def _plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    from common.svg_charts import PALETTE, Bars, write_bar_charts

    labels = [r["label"] for r in rows]
    panels = [
        Bars(column, labels, [r[column][0] or 0.0 for r in rows], [r[column][1] or 0.0 for r in rows], colour)
        for column, colour in (("ACC %", PALETTE[0]), ("forgetting pts", PALETTE[3]))
    ]
    write_bar_charts(path, panels, title)
