"""Drift detection and reaction under asynchronous drift (issue figure 3).

Runs the async-split-mnist preset (each client switches task up to --spread rounds late)
with the same method several ways: no reaction; reactions that act in the round after a
detection (the server's: every client and more local epochs after a quorum of drift
reports; the client's: a learning-rate boost); and reactions that act in the very round
of the detection (the client's: extra local epochs before it replies; the server's: a
drifting client's reply weighs more in that round's aggregate). Prints, per variant and
seed: the share of task switches detected within one and two rounds, the mean delay, false
alarms (per run and per 100 client-rounds), precision, the drift reports the server credited
and denied (``server.drift_credit``), rounds until the global model's accuracy on a new task reaches 90% of its best, rounds
until a switching client's prequential accuracy is back to 90% of its level before the
switch, the new task's accuracy over its first three rounds, ACC, and wall time; then the
means over seeds.

Variants by short name: none, server-next, lr-next, epochs-now, weight-now, both.

Usage: python benchmarks/drift.py --data-dir ../shared/datasets [--json] [--seeds 1] [--variants none,both]
       [--set drift_detector=accuracy-drop]
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

# short name -> (what it does, its settings)
VARIANTS = {
    "none": ("no reaction", {}),
    "server-next": ("server: next round boosted", {"react_server": True}),
    "lr-next": ("client: next round lr x2", {"react_lr_boost": 2.0}),
    "epochs-now": ("client: +2 epochs now", {"react_extra_epochs": 2}),
    "weight-now": ("server: weight x3 now", {"drift_weight": 3.0}),
    "both": ("client +2 epochs and server x3 now", {"react_extra_epochs": 2, "drift_weight": 3.0}),
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
    parser.add_argument("--liars", action="store_true", help="instead: the influence of a client that reports drift "
                        "every round (partition 0), under the first chosen variant's reaction")
    parser.add_argument("--liar-runs", default="", help="with --liars: only these runs, by their first word "
                        "(no, drift-liar, drift-faker, drift-follower)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from "
                         + ", ".join(f"{short} ({what})" for short, (what, _) in VARIANTS.items()))

    settings = preset_settings(args.preset)
    settings.update(data_dir=args.data_dir, method=args.method, async_spread=args.spread,
                    drift_quorum=args.quorum, quiet=True)
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key.replace("-", "_")] = value
    base = RunConfig.from_mapping(settings)
    if args.liars:
        liar_report(base, VARIANTS[chosen[0]], args.seeds, args.json,
                    [r.strip() for r in args.liar_runs.split(",") if r.strip()])
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            changes = VARIANTS[name][1]
            for seed in range(args.seeds):
                config = base.replace(seed=seed, out=str(Path(tmp) / f"{name}-{seed}"), **changes)
                s = run_inprocess(config)
                d = s["drift_detection"]
                rows.append({
                    "variant": name, "seed": seed, "switches": d["switches"], "detected": d["detected"],
                    "detection_rate": d["detection_rate"], "detection_rate_within_2": d["detection_rate_within_2"],
                    "mean_delay_rounds": d["mean_delay_rounds"], "false_alarms": d["false_alarms"],
                    "false_alarms_per_100": d["false_alarms_per_100"], "precision": d["precision"],
                    "credited": s.get("drift_reports_credited"), "denied": s.get("drift_reports_denied"),
                    "rounds_to_recover": s["rounds_to_recover"],
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
    console = Console(width=200)
    table = Table(title=f"drift under asynchronous switches ({args.preset}, {args.method}, spread {args.spread})")
    for column in ("variant", "seed", "recall 1 round", "recall 2 rounds %", "mean delay", "false alarms",
                   "per 100 client-rounds", "precision %", "credited / denied", "rounds to recover (global)",
                   "rounds to recover (client)", "new-task acc, first 3 rounds %", "ACC %", "wall s"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["variant"], str(r["seed"]), f"{r['detected']}/{r['switches']} ({100 * r['detection_rate']:.0f}%)",
                      _fmt(r["detection_rate_within_2"], 100), f"{r['mean_delay_rounds']:.2f}", str(r["false_alarms"]),
                      _fmt(r["false_alarms_per_100"]), _fmt(r["precision"], 100), f"{r['credited']} / {r['denied']}",
                      _fmt(r["rounds_to_recover"]), _fmt(r["client_rounds_to_recover"]),
                      _fmt(r["new_task_early_acc"], 100), f"{100 * r['acc']:.2f}", f"{r['wall_seconds']:.0f}")
    console.print(table)
    table = Table(title=f"means over {args.seeds} seed(s)")
    for column in ("variant", "recall 1 round %", "recall 2 rounds %", "false alarms", "per 100 client-rounds",
                   "precision %", "rounds to recover (global)", "rounds to recover (client)",
                   "new-task acc, first 3 rounds %", "ACC %"):
        table.add_column(column, justify="right")
    for m in means:
        table.add_row(m["variant"], _fmt(m["detection_rate"], 100), _fmt(m["detection_rate_within_2"], 100),
                      _fmt(m["false_alarms"]), _fmt(m["false_alarms_per_100"]), _fmt(m["precision"], 100),
                      _fmt(m["rounds_to_recover"]), _fmt(m["client_rounds_to_recover"]),
                      _fmt(m["new_task_early_acc"], 100), f"{100 * m['acc']:.2f}")
    console.print(table)


LIAR_RUNS = {
    "no liar": {},
    "drift-liar (reports drift every round)": {"attack": "drift-liar", "attackers": 1},
    "drift-faker (also fakes a fall in pre-acc every 2nd round)": {"attack": "drift-faker", "attackers": 1},
    "drift-follower (one fake fall every 5 rounds, low pre-acc between)": {"attack": "drift-follower", "attackers": 1},
    "drift-liar, --drift-evidence 0 (the client's word)": {"attack": "drift-liar", "attackers": 1, "drift_evidence": 0.0},
}


def liar_report(base: RunConfig, variant: tuple[str, dict], seeds: int, as_json: bool, runs: list[str]) -> None:
    """Partition 0's influence (its mean share of the aggregation weight over the rounds,
    from ``weight-share`` in metrics.jsonl) against the honest clients', when it reports
    drift every round to be weighed up by the reaction ``variant``."""
    what, changes = variant
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run, attack in LIAR_RUNS.items():
            if runs and run.split(" ")[0].rstrip(",") not in runs and run not in runs:
                continue
            for seed in range(seeds):
                out = Path(tmp) / f"{len(rows)}"
                summary = run_inprocess(base.replace(seed=seed, out=str(out), **changes, **attack))
                shares: dict[int, list[float]] = {}
                credited = 0
                for line in (out / "metrics.jsonl").read_text().splitlines():
                    for client in json.loads(line)["clients"]:
                        shares.setdefault(client["node"], []).append(client.get("weight-share", 0.0))
                        credited += client.get("drift-credited", 0) if client["node"] == 1 else 0
                mean = {node: sum(v) / len(v) for node, v in shares.items()}
                honest = [share for node, share in mean.items() if node != 1]  # node 1 is partition 0
                rows.append({"run": run, "seed": seed, "liar_share": mean.get(1), "honest_mean": sum(honest) / len(honest),
                             "honest_max": max(honest), "liar_credited": credited, "acc": summary["acc"]})
                print(json.dumps(rows[-1]), file=sys.stderr)
    if as_json:
        print(json.dumps({"reaction": what, "rows": rows}, indent=2))
        return
    table = Table(title=f"a client that reports drift every round, reaction: {what} (its share of the aggregate "
                        f"weight, mean over rounds; partition 0)")
    for column in ("run", "seed", "partition 0 %", "honest mean %", "honest max %", "rounds acted on (partition 0)", "ACC %"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["run"], str(r["seed"]), f"{100 * r['liar_share']:.2f}", f"{100 * r['honest_mean']:.2f}",
                      f"{100 * r['honest_max']:.2f}", str(r["liar_credited"]), f"{100 * r['acc']:.2f}")
    Console(width=200).print(table)


MEAN_KEYS = ("detection_rate", "detection_rate_within_2", "false_alarms", "false_alarms_per_100", "precision",
             "rounds_to_recover", "client_rounds_to_recover", "new_task_early_acc", "acc")


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
