"""Drift detection and reaction under asynchronous drift (issue figure 3).

Runs the async-split-mnist preset (each client switches task up to --spread rounds late)
with the same method several ways: no reaction; reactions that act in the round after a
detection (the server's: every client and more local epochs after a quorum of drift
reports; the client's: a learning-rate boost); and reactions that act in the very round
of the detection (the client's: extra local epochs before it replies; the server's: a
drifting client's reply weighs more in that round's aggregate). Prints, per variant and
seed: the share of task switches detected within one round, the mean delay, false alarms,
rounds until the global model's accuracy on a new task reaches 90% of its best, rounds
until a switching client's prequential accuracy is back to 90% of its level before the
switch, the new task's accuracy over its first three rounds, ACC, and wall time; then the
means over seeds.

Usage: python benchmarks/drift.py --data-dir ../shared/datasets [--json] [--seeds 1] [--variants A,B]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common.config import RunConfig  # noqa: E402
from fedtide.runtimes.inprocess import run_inprocess  # noqa: E402
from fedtide.presets import preset_settings  # noqa: E402

VARIANTS = {
    "no reaction": {},
    "server: next round boosted": {"react_server": True},
    "client: next round lr x2": {"react_lr_boost": 2.0},
    "client: +2 epochs now": {"react_extra_epochs": 2},
    "server: weight x3 now": {"drift_weight": 3.0},
    "client +2 epochs and server x3 now": {"react_extra_epochs": 2, "drift_weight": 3.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDTIDE_DATA_DIR", ""))
    parser.add_argument("--preset", default="async-split-mnist")
    parser.add_argument("--method", default="replay")
    parser.add_argument("--spread", type=int, default=3, help="rounds by which switches may lag")
    parser.add_argument("--quorum", type=float, default=0.2, help="drift share that triggers the server reaction")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--variants", default="", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")

    settings = preset_settings(args.preset)
    settings.update(data_dir=args.data_dir, method=args.method, async_spread=args.spread,
                    drift_quorum=args.quorum, quiet=True)
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key.replace("-", "_")] = value
    base = RunConfig.from_mapping(settings)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            changes = VARIANTS[name]
            for seed in range(args.seeds):
                config = base.replace(seed=seed, out=str(Path(tmp) / f"{name}-{seed}"), **changes)
                s = run_inprocess(config)
                d = s["drift_detection"]
                rows.append({
                    "variant": name, "seed": seed, "switches": d["switches"], "detected": d["detected"],
                    "detection_rate": d["detection_rate"], "mean_delay_rounds": d["mean_delay_rounds"],
                    "false_alarms": d["false_alarms"], "rounds_to_recover": s["rounds_to_recover"],
                    "new_task_early_acc": s["new_task_early_acc"],
                    "client_rounds_to_recover": s["client_rounds_to_recover"],
                    "acc": s["acc"], "boosted_rounds": len(s.get("boosted_rounds", [])),
                    "wall_seconds": s["wall_seconds"],
                })
                print(json.dumps(rows[-1]), file=sys.stderr)
    means = mean_rows(rows)
    if args.json:
        print(json.dumps({"preset": args.preset, "method": args.method, "spread": args.spread, "rows": rows,
                          "means": means}, indent=2))
        return
    table = Table(title=f"drift under asynchronous switches ({args.preset}, {args.method}, spread {args.spread})")
    for column in ("variant", "seed", "detected within 1 round", "mean delay", "false alarms",
                   "rounds to recover (global)", "rounds to recover (client)", "new-task acc, first 3 rounds %", "boosted rounds", "ACC %", "wall s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["variant"], str(r["seed"]), f"{r['detected']}/{r['switches']} ({100 * r['detection_rate']:.0f}%)",
                      f"{r['mean_delay_rounds']:.2f}", str(r["false_alarms"]),
                      "-" if r["rounds_to_recover"] is None else f"{r['rounds_to_recover']:.2f}",
                      "-" if r["client_rounds_to_recover"] is None else f"{r['client_rounds_to_recover']:.2f}",
                      "-" if r["new_task_early_acc"] is None else f"{100 * r['new_task_early_acc']:.2f}",
                      str(r["boosted_rounds"]), f"{100 * r['acc']:.2f}", f"{r['wall_seconds']:.0f}")
    console = Console(width=200)
    console.print(table)
    table = Table(title=f"means over {args.seeds} seed(s)")
    for column in ("variant", "detected within 1 round %", "false alarms", "rounds to recover (global)",
                   "rounds to recover (client)", "new-task acc, first 3 rounds %", "ACC %"):
        table.add_column(column, justify="right")
    for m in means:
        table.add_row(m["variant"], f"{100 * m['detection_rate']:.1f}", f"{m['false_alarms']:.1f}",
                      _fmt(m["rounds_to_recover"]), _fmt(m["client_rounds_to_recover"]),
                      _fmt(m["new_task_early_acc"], 100), f"{100 * m['acc']:.2f}")
    console.print(table)


MEAN_KEYS = ("detection_rate", "false_alarms", "rounds_to_recover", "client_rounds_to_recover", "new_task_early_acc", "acc")


def mean_rows(rows: list[dict]) -> list[dict]:
    """Per variant, the mean of each figure over the seeds that have it (None if none has)."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        entry: dict = {"variant": variant, "seeds": len(mine)}
        for key in MEAN_KEYS:
            values = [r[key] for r in mine if r[key] is not None]
            entry[key] = sum(values) / len(values) if values else None
        out.append(entry)
    return out


def _fmt(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{scale * value:.2f}"


if __name__ == "__main__":
    main()
