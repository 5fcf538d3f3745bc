"""Figures of the release part of the operations issue (#17): the release gate under attack.

Split-MNIST, 10 clients, DER; plain FedAvg (no influence bound, no outlier rule). In the attacked
run, 4 of the 10 clients send their update reversed and scaled x4 for 3 rounds in the middle of
task 2. Printed:

- how far the raw global model falls (points, mean accuracy over the tasks seen);
- how far the released model ever is below the best earlier release on the tasks seen (<= 2);
- the rounds from the raw model's recovery (back within 2 points of its accuracy before the
  attack) to the next release (<= 3);
- in the clean run, the releases per task (>= 1 each: a gate that never releases fails).

Usage: python benchmarks/release_gate.py --data-dir ../shared/datasets [--seed 0] [--json]
       [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overrides import parse_overrides  # noqa: E402

from common.config import RunConfig
from fedtide.presets import preset_settings
from fedtide.runtimes.inprocess import run_inprocess
from server.model_registry import ModelRegistry
from server.release_gate import served_timeline

ATTACKED_TASK, FIRST_ATTACK_OFFSET, ATTACK_ROUNDS, ATTACKERS, SCALE = 2, 4, 3, 4, 4.0
RECOVERED_WITHIN = 2.0  # points below the raw model's accuracy before the attack


def settings(data_dir: str, seed: int, attacked: bool, overrides: dict) -> RunConfig:
    base = {**preset_settings("split-mnist"), "data_dir": data_dir, "method": "der", "seed": seed, "quiet": True,
            "norm_cap": 0.0, "norm_outlier": 0.0, "weight_cap": 0.0, **overrides}
    if attacked:
        first = ATTACKED_TASK * base["rounds_per_task"] + FIRST_ATTACK_OFFSET
        base.update(attack="flip-scale", attack_scale=SCALE, attackers=ATTACKERS,
                    attack_rounds=f"{first}-{first + ATTACK_ROUNDS - 1}")
    return RunConfig.of(**base)


def run(config: RunConfig, out: Path) -> list[dict]:
    run_inprocess(config.replace(out=str(out)), threads=1)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with ModelRegistry(out).open() as registry:
        versions = registry.versions
    return served_timeline(versions, rounds)


def figures(clean: list[dict], attacked: list[dict], config: RunConfig) -> dict:
    first, last = (int(r) for r in config.faults.attack_rounds.split("-"))
    before = next(r for r in attacked if r["round"] == first - 1)["raw"]
    during = [r for r in attacked if first <= r["round"] <= last + 1]
    recovery = next((r["round"] for r in attacked if r["round"] > last and r["raw"] >= before - RECOVERED_WITHIN), None)
    release_after = None if recovery is None else next(
        (r["round"] for r in attacked if r["round"] >= recovery and r["new"]), None)
    shortfall = max(r["best_release"] - r["served"] for r in attacked if r["served"] is not None)
    per_task = {t: sum(1 for r in clean if r["new"] and r["task"] == t) for t in range(config.data.num_tasks)}
    return {
        "attack_rounds": [first, last],
        "raw_before_attack": before,
        "raw_lowest": min(r["raw"] for r in during),
        "raw_drop": before - min(r["raw"] for r in during),
        "served_lowest_during_attack": min(r["served"] for r in during),
        "served_max_shortfall": shortfall,
        "recovery_round": recovery,
        "release_after_recovery_round": release_after,
        "rounds_to_release": None if release_after is None else release_after - recovery,
        "clean_releases_per_task": per_task,
        "clean_releases": sum(per_task.values()),
        "attacked_releases": sum(1 for r in attacked if r["new"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = parse_overrides(args.set)
    logging.getLogger("fedtide").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        clean_config = settings(args.data_dir, args.seed, False, overrides)
        attacked_config = settings(args.data_dir, args.seed, True, overrides)
        clean = run(clean_config, Path(tmp) / "clean")
        attacked = run(attacked_config, Path(tmp) / "attacked")
    out = figures(clean, attacked, attacked_config)
    if args.json:
        print(json.dumps({"seed": args.seed, **out, "attacked_timeline": attacked}, indent=2))
        return
    table = Table(title=f"release gate under attack: split-MNIST, 10 clients, DER, seed {args.seed}; "
                  f"{ATTACKERS} clients flip x{SCALE:g} in rounds {out['attack_rounds'][0]}-{out['attack_rounds'][1]}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row("raw global model: fall during the attack (points, tasks seen)", f"{out['raw_drop']:.2f}", "large")
    table.add_row("released model: most points below the best earlier release", f"{out['served_max_shortfall']:.2f}", "<= 2")
    table.add_row("rounds from recovery (raw within 2 points) to the next release",
                  "none" if out["rounds_to_release"] is None else str(out["rounds_to_release"]), "<= 3")
    table.add_row("clean run: releases per task", ", ".join(str(v) for v in out["clean_releases_per_task"].values()),
                  ">= 1 each")
    Console().print(table)
    console = Console()
    console.print("round  raw%   served%  version")
    for r in attacked:
        if out["attack_rounds"][0] - 2 <= r["round"] <= out["attack_rounds"][1] + 5:
            served = "-" if r["served"] is None else f"{r['served']:.2f}"
            console.print(f"{r['round']:5d}  {r['raw']:5.2f}  {served:>7}  v{r['version']}{' new' if r['new'] else ''}")


if __name__ == "__main__":
    sys.exit(main())
