"""Drift detection and reaction under asynchronous drift (issue figure 3).

Runs the async-split-mnist preset (each client switches task up to --spread rounds late)
with the same method four ways: no reaction, the server's reaction (every client and more
local epochs after a round where a quorum of clients reported drift), the clients'
learning-rate boost after their own detection, and both. Prints, per variant: the share
of task switches detected within one round, the mean delay, false alarms, rounds until
the global model's accuracy on a new task reaches 90% of its best, rounds until a switching
client's prequential accuracy is back to 90% of its level before the switch, the new
task's accuracy over its first three rounds, ACC, and wall time.

Usage: python benchmarks/drift.py --data-dir ../shared/datasets [--json] [--seeds 1]
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
from fedtide.inprocess import run_inprocess  # noqa: E402
from fedtide.presets import preset_settings  # noqa: E402

VARIANTS = {
    "no reaction": {},
    "server reaction": {"react_server": True},
    "client lr boost": {"react_lr_boost": 2.0},
    "both": {"react_server": True, "react_lr_boost": 2.0},
    "server reaction, 4x epochs": {"react_server": True, "drift_epoch_boost": 4},
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    settings = preset_settings(args.preset)
    settings.update(data_dir=args.data_dir, method=args.method, async_spread=args.spread,
                    drift_quorum=args.quorum, quiet=True)
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key.replace("-", "_")] = value
    base = RunConfig.from_mapping(settings)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, changes in VARIANTS.items():
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
    if args.json:
        print(json.dumps({"preset": args.preset, "method": args.method, "spread": args.spread, "rows": rows}, indent=2))
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
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
