"""Figures of the robustness issue (#7), from one command:

a. 1000 fuzzed replies (``tests/reply_fuzz.py``: wrong/missing keys, shapes, dtypes, NaN/Inf,
   huge norms, bad num-examples, truncated bytes, empty records...) fed to validation and
   every aggregation rule (under FedAvg, FedAdam and FedAvgM): crashes and non-finite
   global models, both must be 0.
b. A federation of 10 clients, 2 of them attacking (sign-flip, scale x10, NaN): final ACC of
   clean FedAvg, attacked FedAvg and attacked robust rules (median, trimmed-mean,
   multikrum, clip), in-process, same seed.

Usage: python benchmarks/robustness.py [--json] [--seed N] [--skip-attacks] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common.config import RunConfig
from common.schedule import TaskSchedule
from fedtide.runtimes.inprocess import run_inprocess
from server.history import RunHistory
from server.strategy import run_strategy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reply_fuzz import fuzz_replies, run_fuzz  # noqa: E402  (a test tool, kept with the tests)
from overrides import parse_overrides  # noqa: E402

RULES = ("fedavg", "median", "trimmed-mean", "multikrum", "clip")
ATTACKS = {"sign-flip": {"attack": "sign-flip"}, "scale x10": {"attack": "scale", "attack_scale": 10.0},
           "nan": {"attack": "nan"}}
# the attack scenario: 10 clients, 2 attackers, all 10 digits in one task (so that forgetting
# does not blur the comparison), plain SGD so a round's clients train in one batched
# computation; a few minutes on 2 cores for all 16 runs. Honest updates have L2 norms of
# ~0.35 in round 1 (less later), hence clip-norm 0.5.
SCENARIO = dict(
    dataset="digits", scenario="class-incremental", num_tasks=1, clients=10, iid=True,
    rounds_per_task=8, local_epochs=2, method="naive", quiet=True,
)
ROBUST = dict(trim_fraction=0.2, tolerated_attackers=2, clip_norm=0.5)


def rule_settings(rule: str) -> dict:
    return {"aggregation": rule, **ROBUST} if rule != "fedavg" else {}


def fuzz(seed: int, replies: int = 1000, per_round: int = 10) -> list[dict]:
    rng = np.random.default_rng(seed)
    global_arrays = {"w": rng.normal(size=(32, 16)).astype(np.float32), "b": np.zeros(16, np.float32)}
    records = fuzz_replies(global_arrays, replies, seed)
    rows = []
    for strategy in ("fedavg", "fedadam", "fedavgm"):
        for rule in RULES:
            config = RunConfig.of(clients=per_round, strategy=strategy, **rule_settings(rule))
            history = RunHistory(TaskSchedule.build(1, replies // per_round, per_round, 0, seed))
            with np.errstate(all="ignore"):  # FedAdam squares huge updates: overflow is what we test
                result = run_fuzz(run_strategy(config, history), global_arrays, [c for _, c in records], per_round)
            rows.append({"strategy": strategy, "rule": rule, "replies": result.replies, "accepted": result.accepted,
                         "crashes": result.crashes, "non_finite": result.non_finite, "rounds_kept": result.rounds_kept})
    return rows


def attacked_runs(seed: int, overrides: dict, out: Path) -> list[dict]:
    base = RunConfig.of(**{**SCENARIO, **overrides, "seed": seed})
    runs = [("clean", "fedavg", {})]
    for name, attack in ATTACKS.items():
        runs += [(name, rule, {**attack, "attackers": 2}) for rule in RULES]
    rows = []
    for attack, rule, settings in runs:
        started = time.perf_counter()
        config = base.replace(out=str(out / f"{attack}-{rule}".replace(" ", "")), **settings, **rule_settings(rule))
        summary = run_inprocess(config)
        rows.append({"attack": attack, "rule": rule, "acc": summary["acc"], "rejected": summary["rejected_replies"],
                     "seconds": time.perf_counter() - started})
    clean = rows[0]["acc"]
    for row in rows:
        row["vs_clean_points"] = 100 * (row["acc"] - clean)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-attacks", action="store_true", help="only the fuzz (a few seconds)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the attack scenario")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("fedtide").setLevel(logging.ERROR)  # every dropped reply would be a line
    result = {"seed": args.seed, "fuzz": fuzz(args.seed)}
    if not args.skip_attacks:
        overrides = parse_overrides(args.set)
        result["scenario"] = {**SCENARIO, **ROBUST, **overrides, "attackers": 2}
        with tempfile.TemporaryDirectory() as tmp:
            result["attacks"] = attacked_runs(args.seed, overrides, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    console = Console()
    table = Table(title=f"1000 fuzzed replies per row (seed {args.seed})")
    for column in ("strategy", "rule", "accepted", "crashes", "non-finite globals", "rounds kept"):
        table.add_column(column, justify="right")
    for r in result["fuzz"]:
        table.add_row(r["strategy"], r["rule"], str(r["accepted"]), str(r["crashes"]), str(r["non_finite"]),
                      str(r["rounds_kept"]))
    console.print(table)
    if "attacks" in result:
        table = Table(title="2 of 10 clients attacking: final ACC (" + ", ".join(
            f"{k}={v}" for k, v in result["scenario"].items() if k not in ("quiet",)) + ")")
        for column in ("attack", "aggregation", "ACC %", "vs clean (pts)", "rejected replies", "s"):
            table.add_column(column, justify="right")
        for r in result["attacks"]:
            table.add_row(r["attack"], r["rule"], f"{100 * r['acc']:.2f}", f"{r['vs_clean_points']:+.2f}",
                          str(r["rejected"]), f"{r['seconds']:.1f}")
        console.print(table)


if __name__ == "__main__":
    main()
