"""Figures of the trust-boundary issue (#15): what a lying or broken client can do to a run.

a. Reply fuzzing: ``--replies`` fuzzed replies (``tests/reply_fuzz.py``: broken arrays, bad
   ``num-examples``, and metrics that are extra, missing, of the wrong type, non-finite, huge
   or spoof a node id) per strategy x rule, straight into the strategy: crashes and
   non-finite global models, both must be 0.
b. The same fuzz inside complete in-process runs (round loop, history, drift log, summary):
   clients that replace about half of their replies by fuzzed ones. Each run must finish with
   every round once in metrics.jsonl, only real node ids in metrics.jsonl and the drift log,
   finite figures and a finite model. One more such run under Flower's simulation engine.
c. Influence of one liar of 10 (claims ``num-examples`` 1,000,000, sends a boosted
   replacement model): the largest ratio, over rounds, of how far the global model moved to
   the round's median honest update norm, and the final ACC; default settings against the
   plain weighted mean (``--weight-cap 0 --norm-cap 0``).
d. Backdoor (corner trigger, target class 0), 2 of 10 attackers claiming 1,000,000 samples:
   the share of triggered test images (true class not 0) classified as 0, boosted model
   replacement (x10) and the norm-constrained attack (x1.9: just under the default norm cap
   when the attacker's own update is about the median), under the default rule and the
   plain mean.

Usage: python benchmarks/trust.py [--seed N] [--replies N] [--skip-engine] [--parts abcd] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])

from reply_fuzz import fuzz_replies, fuzzing_client_app, run_fuzz  # noqa: E402  (a test tool)

from client.faults import BACKDOOR_TARGET, add_trigger  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.models import build_model  # noqa: E402
from common.scenarios import build_scenario  # noqa: E402
from common.schedule import TaskSchedule  # noqa: E402
from fedtide.runtimes.inprocess import InProcessGrid, node_configs, run_inprocess  # noqa: E402
from server import federation  # noqa: E402
from server.history import RunHistory  # noqa: E402
from server.robust import update_norm  # noqa: E402
from server.strategy import run_strategy  # noqa: E402

RULES = {"fedavg": {}, "median": {"aggregation": "median"}, "trimmed-mean": {"aggregation": "trimmed-mean",
         "trim_fraction": 0.2}, "multikrum": {"aggregation": "multikrum", "tolerated_attackers": 2},
         "clip": {"aggregation": "clip", "clip_norm": 0.5}}
# complete runs: split digits in 2 tasks, 10 clients, drift detection on
RUN = dict(dataset="digits", num_tasks=2, rounds_per_task=3, clients=10, local_epochs=1, quiet=True)
FULL_RUNS = {
    "fedavg, replay": {},
    "median, naive": {"aggregation": "median", "method": "naive"},
    "fedadam, trimmed-mean": {"strategy": "fedadam", "aggregation": "trimmed-mean", "trim_fraction": 0.2},
    "fedavgm, drift reactions": {"strategy": "fedavgm", "react_server": True, "drift_weight": 3.0},
}
# attacks: all ten digits in one task, iid, plain SGD (as benchmarks/robustness.py)
ATTACK_RUN = dict(dataset="digits", scenario="class-incremental", num_tasks=1, clients=10, iid=True,
                  rounds_per_task=8, local_epochs=2, method="naive", quiet=True)
SPOOFED_NODES = {-7, 123456789}  # the ids tests/reply_fuzz.py's replies claim
PLAIN = {"weight_cap": 0.0, "norm_cap": 0.0, "norm_outlier": 0.0}
CLAIM = 1_000_000


def fuzz(seed: int, replies: int, per_round: int = 10) -> list[dict]:
    rng = np.random.default_rng(seed)
    global_arrays = {"w": rng.normal(size=(32, 16)).astype(np.float32), "b": np.zeros(16, np.float32)}
    records = [content for _, content in fuzz_replies(global_arrays, replies, seed)]
    rows = []
    for strategy in ("fedavg", "fedadam", "fedavgm"):
        for rule, settings in RULES.items():
            config = RunConfig.of(clients=per_round, strategy=strategy, **settings)
            history = RunHistory(TaskSchedule.build(1, replies // per_round, per_round, 0, seed))
            with np.errstate(all="ignore"):  # FedAdam squares huge updates: overflow is what we test
                result = run_fuzz(run_strategy(config, history), global_arrays, records, per_round)
            rows.append({"strategy": strategy, "rule": rule, "replies": result.replies, "accepted": result.accepted,
                         "crashes": result.crashes, "non_finite": result.non_finite})
    return rows


def check_run_folder(folder: Path, summary: dict, nodes: set[int] | None, config: RunConfig) -> list[str]:
    """What is wrong with a finished run's folder (empty: nothing). ``nodes``: the real node
    ids, where known (Flower's engine draws them: then at most one id per client, and none
    of the ids the fuzz claims)."""
    rounds = config.data.num_tasks * config.data.rounds_per_task
    problems = []
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    numbers = [line["round"] for line in lines]
    if numbers != list(range(1, rounds + 1)):
        problems.append(f"rounds in metrics.jsonl: {numbers}")
    seen = {c["node"] for line in lines for c in line["clients"]}
    drift_file = folder / "drift_events.jsonl"
    drifts = [json.loads(x) for x in drift_file.read_text().splitlines() if x.strip()] if drift_file.exists() else []
    seen |= {event["node"] for event in drifts}
    if nodes is not None and not seen <= nodes:
        problems.append(f"node ids that are no node: {sorted(seen - nodes)[:5]}")
    if nodes is None and (len(seen) > config.data.clients or seen & SPOOFED_NODES):
        problems.append(f"node ids that are no node: {sorted(seen)[:12]}")
    for key in ("acc", "bwt", "fwt", "final_prequential_acc"):
        value = summary.get(key)
        if value is not None and not (math.isfinite(value) and -1 <= value <= 1):
            problems.append(f"summary {key} = {value}")
    if any(c.get("task-id", 0) >= RUN["num_tasks"] for line in lines for c in line["clients"]):
        problems.append("a task-id beyond the run's tasks")
    if not all(torch.isfinite(t).all() for t in _weights(folder).values()):
        problems.append("the final model is not finite")
    return problems


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def full_runs(seed: int, out: Path, engine: bool) -> list[dict]:
    rows = []
    for name, settings in FULL_RUNS.items():
        config = RunConfig.of(**{**RUN, **settings, "seed": seed, "out": str(out / name.replace(", ", "-"))})
        sent: list[str] = []
        grid = InProcessGrid(fuzzing_client_app(seed, 0.5, sent), node_configs(config))
        rows.append(_full_run(name, config, lambda: federation.run_federation(grid, config),
                              lambda: set(grid.get_node_ids()), sent))
    if engine:
        from fedtide.runtimes.flower_engine import run_flower_simulation

        config = RunConfig.of(**{**RUN, "clients": 4, "seed": seed, "out": str(out / "flower-engine")})
        rows.append(_full_run("Flower engine, fedavg", config,
                              lambda: run_flower_simulation(config, fuzzing_client_app(seed, 0.5)), lambda: None, None))
    return rows


def _full_run(name: str, config: RunConfig, run, nodes, sent: list[str] | None) -> dict:
    started = time.perf_counter()
    try:
        summary, ended = run(), None
    except Exception as err:  # counted: this is what the fuzz looks for
        summary, ended = {}, f"{type(err).__name__}: {err}"
    rounds = config.data.num_tasks * config.data.rounds_per_task
    problems = [ended] if ended else check_run_folder(Path(config.run.out), summary, nodes(), config)
    fuzzed = sum(kind != "honest" for kind in sent) if sent is not None else None
    return {"run": name, "replies": len(sent) if sent is not None else rounds * config.data.clients,
            "fuzzed": fuzzed, "rejected": summary.get("rejected_replies"), "ended": int(ended is not None),
            "problems": problems, "acc": summary.get("acc"), "seconds": time.perf_counter() - started}


class Movement:
    """Per round: how far the global model moved, over the median norm of the honest
    updates (the replies that do not claim ``CLAIM``)."""

    def __init__(self) -> None:
        self.ratios: list[float] = []

    def strategy(self, config, history, times=None):
        strategy = run_strategy(config, history, times)
        aggregate = strategy._aggregate

        def measured(server_round, valid, *rest):
            reference = strategy._reference
            honest = [update_norm({k: a.numpy() for k, a in r.content["arrays"].items()}, reference)
                      for r in valid if r.content["metrics"]["num-examples"] != CLAIM]
            new, metrics = aggregate(server_round, valid, *rest)
            if new is not None and honest:
                moved = update_norm({k: a.numpy() for k, a in new.items()}, reference)
                self.ratios.append(moved / float(np.median(honest)))
            return new, metrics

        strategy._aggregate = measured
        return strategy


def influence(seed: int, out: Path) -> list[dict]:
    base = RunConfig.of(**{**ATTACK_RUN, "seed": seed})
    liar = dict(attack="replace", attackers=1, attack_scale=10.0, attack_claim=CLAIM)
    rows = []
    for name, settings in [("no attacker, default", {}), ("1 liar x10, default", liar),
                           ("1 liar x4 (under --norm-outlier), default", {**liar, "attack_scale": 4.0}),
                           ("1 liar x10, plain mean", {**liar, **PLAIN})]:
        movement = Movement()
        federation.run_strategy = movement.strategy
        try:
            summary = run_inprocess(base.replace(out=str(out / name.replace(", ", "-").replace(" ", "_")), **settings))
        finally:
            federation.run_strategy = run_strategy
        rows.append({"run": name, "acc": summary["acc"], "max_ratio": max(movement.ratios),
                     "median_ratio": float(np.median(movement.ratios))})
    return rows


def backdoor_success(folder: Path, config: RunConfig) -> float:
    """Share of triggered test images whose true class is not the target that the run's
    final model classifies as the target."""
    scenario = build_scenario(config.data, config.seed)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes,
                        config.network.hidden_widths, config.seed)
    model.load_state_dict(_weights(folder))
    model.eval()
    data = scenario.test_data(0)
    keep = data.y != BACKDOOR_TARGET
    with torch.no_grad():
        predicted = model(add_trigger(data.x[keep], float(data.x.max()))).argmax(dim=1)
    return float((predicted == BACKDOOR_TARGET).float().mean())


def backdoor(seed: int, out: Path) -> list[dict]:
    base = RunConfig.of(**{**ATTACK_RUN, "seed": seed})
    attack = dict(attack="backdoor", attackers=2, attack_claim=CLAIM)
    rows = []
    for name, settings in [("no attacker, default", {}),
                           ("boosted x10, default", {**attack, "attack_scale": 10.0}),
                           ("norm-constrained x1.9, default", {**attack, "attack_scale": 1.9}),
                           ("unboosted x1, default", {**attack, "attack_scale": 1.0}),
                           ("boosted x10, plain mean", {**attack, "attack_scale": 10.0, **PLAIN}),
                           ("boosted x10, median", {**attack, "attack_scale": 10.0, "aggregation": "median"}),
                           ("norm-constrained x1.9, median", {**attack, "attack_scale": 1.9, "aggregation": "median"})]:
        config = base.replace(out=str(out / ("bd-" + name.replace(", ", "-").replace(" ", "_"))), **settings)
        summary = run_inprocess(config)
        rows.append({"run": name, "acc": summary["acc"], "backdoor": backdoor_success(Path(config.run.out), config)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replies", type=int, default=700, help="fuzzed replies per strategy x rule (15 of them)")
    parser.add_argument("--skip-engine", action="store_true", help="no run under Flower's simulation engine")
    parser.add_argument("--parts", default="abcd", help="which of the parts a-d to run (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("fedtide").setLevel(logging.ERROR)  # every dropped reply would be a line
    result: dict = {"seed": args.seed}
    if "a" in args.parts:
        result["fuzz"] = fuzz(args.seed, args.replies)
    with tempfile.TemporaryDirectory() as tmp:
        if "b" in args.parts:
            result["runs"] = full_runs(args.seed, Path(tmp), not args.skip_engine)
        if "c" in args.parts:
            result["influence"] = influence(args.seed, Path(tmp))
        if "d" in args.parts:
            result["backdoor"] = backdoor(args.seed, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    show(result)


def show(result: dict) -> None:
    console = Console()
    if "fuzz" in result:
        show_fuzz(console, result)
    if "runs" in result:
        show_runs(console, result["runs"])
    if "influence" in result:
        show_influence(console, result["influence"])
    if "backdoor" in result:
        show_backdoor(console, result["backdoor"])


def show_fuzz(console: Console, result: dict) -> None:
    fuzz_rows = result["fuzz"]
    table = Table(title=f"a. fuzzed replies straight into the strategy: {sum(r['replies'] for r in fuzz_rows):,} "
                  f"in all (seed {result['seed']})")
    for column in ("strategy", "rule", "replies", "accepted", "crashes", "non-finite globals"):
        table.add_column(column, justify="right")
    for r in fuzz_rows:
        table.add_row(r["strategy"], r["rule"], str(r["replies"]), str(r["accepted"]), str(r["crashes"]),
                      str(r["non_finite"]))
    console.print(table)


def show_runs(console: Console, runs: list[dict]) -> None:
    table = Table(title="b. complete runs whose clients send fuzzed replies about half the time")
    for column in ("run", "replies", "fuzzed", "rejected", "runs ended", "problems", "ACC %", "s"):
        table.add_column(column, justify="right")
    for r in runs:
        table.add_row(r["run"], str(r["replies"]), "-" if r["fuzzed"] is None else str(r["fuzzed"]),
                      str(r["rejected"]), str(r["ended"]), "; ".join(r["problems"]) or "none",
                      "-" if r["acc"] is None else f"{100 * r['acc']:.2f}", f"{r['seconds']:.1f}")
    console.print(table)


def show_influence(console: Console, rows: list[dict]) -> None:
    table = Table(title=f"c. one liar of 10 (claims {CLAIM:,}, boosted replacement model): global move / "
                  "median honest update")
    for column in ("run", "max ratio", "median ratio", "ACC %"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["run"], f"{r['max_ratio']:.2f}", f"{r['median_ratio']:.2f}", f"{100 * r['acc']:.2f}")
    console.print(table)


def show_backdoor(console: Console, rows: list[dict]) -> None:
    table = Table(title=f"d. backdoor, 2 of 10 attackers claiming {CLAIM:,}: triggered images classified as "
                  f"{BACKDOOR_TARGET}")
    for column in ("attack, rule", "backdoor success %", "ACC %"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["run"], f"{100 * r['backdoor']:.1f}", f"{100 * r['acc']:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
