"""Drift detectors measured as a detection problem (issue 20), on streams with known switches.

For each federated scenario and seed, one run with no drift reaction records, per client and
round, what every detector reads: the prequential error bits (River's detectors) and the
``RoundEvidence`` of the received model before training (the round-level tests). A reaction
changes training, so with none every detector sees the very streams it would see live; each
candidate is then replayed on the recorded streams, with the product's own classes, and scored
against the scenario's true task switches (``common.stream_metrics.score_detections``):
recall within 1 and 2 rounds, mean delay, false alarms per run and per 100 client-rounds, and
precision. Label-free tests are listed apart: they work where labels arrive late.

Also a sanity check of River's detectors on synthetic error streams with known change points
(abrupt and gradual Bernoulli error streams, generated here).

Usage: python benchmarks/drift_detectors.py --data-dir ../shared/datasets [--seeds 3]
       [--scenarios async-split,rotated,dataset-switch,concept] [--json] [--synthetic-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import client.app as client_app  # noqa: E402
import client.rounds as client_rounds  # noqa: E402
from client.drift import DriftMonitor  # noqa: E402
from client.drift_signals import (  # noqa: E402
    LABEL_FREE, SHIFT_THRESHOLD, RoundEvidence, gather_evidence, input_shift_ratio, round_drift,
)
from common.config import RunConfig  # noqa: E402
from common.sections import ROUND_DETECTORS  # noqa: E402
from common.scenarios import build_scenario  # noqa: E402
from common.stream_metrics import score_detections  # noqa: E402
from fedtide.presets import preset_settings  # noqa: E402
from fedtide.runtimes.inprocess import run_inprocess  # noqa: E402

SCENARIOS = {
    "async-split": ("async-split-mnist", {}),
    "rotated": ("rotated-mnist", {}),
    "dataset-switch": ("mnist-fashion", {"num_tasks": 4}),
    "concept": ("concept-drift-mnist", {}),
}

# (name, detector, parameter): River's on the error stream, fedtide's round-level tests
CANDIDATES = [
    ("adwin d=0.002", "adwin", 0.002), ("adwin d=0.01", "adwin", 0.01), ("adwin d=0.05", "adwin", 0.05),
    ("page-hinkley", "page-hinkley", 0.0), ("ddm", "ddm", 0.0), ("eddm", "eddm", 0.0),
    ("hddm-a", "hddm-a", 0.0), ("hddm-w", "hddm-w", 0.0),
    *[(f"accuracy-drop m={m}", "accuracy-drop", m) for m in (0.05, 0.1, 0.15, 0.2, 0.3)],
    *[(f"accuracy-or-inputs m={m}", "accuracy-or-inputs", m) for m in (0.05, 0.1, 0.2)],
    *[(f"confidence-drop m={m}", "confidence-drop", m) for m in (0.05, 0.1, 0.15, 0.2)],
    ("input-shift", "input-shift", 0.0),
]


class Recorder:
    """Patches the client's round to record each (partition, round)'s evidence and errors."""

    def __init__(self) -> None:
        self.records: dict[tuple[int, int], dict] = {}
        self._current: tuple[int, int] | None = None

    def __enter__(self) -> "Recorder":
        self._train_round, self._train_and_react = client_app.train_round, client_rounds.train_and_react
        recorder = self

        def train_round(config, partition_id, server_round, *args, **kwargs):
            recorder._current = (partition_id, server_round)
            return recorder._train_round(config, partition_id, server_round, *args, **kwargs)

        def train_and_react(model, plan, methods, config, state, device, *args, **kwargs):
            evidence = gather_evidence(model, plan.data, device)
            stats, drift = recorder._train_and_react(model, plan, methods, config, state, device, *args, **kwargs)
            recorder.records[recorder._current] = {"task": plan.task, "errors": stats.errors.clone(), "evidence": evidence}
            return stats, drift

        client_app.train_round, client_rounds.train_and_react = train_round, train_and_react
        return self

    def __exit__(self, *exc) -> None:
        client_app.train_round, client_rounds.train_and_react = self._train_round, self._train_and_react

    def streams(self) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        for (partition, server_round), record in sorted(self.records.items()):
            out.setdefault(partition, []).append({"round": server_round, **record})
        return out


def decisions(stream: list[dict], detector: str, parameter: float) -> list[bool]:
    """The candidate's drift decision in each of one client's rounds, replayed in order."""
    out = []
    if detector in ROUND_DETECTORS:
        before = None
        for entry in stream:
            out.append(round_drift(detector, before, entry["evidence"], parameter))
            before = entry["evidence"] or before
        return out
    monitor = DriftMonitor(detector, parameter or 0.01)
    for entry in stream:
        out.append(bool(monitor.update(entry["errors"])))
    return out


def score(streams: dict[int, list[dict]], detector: str, parameter: float) -> dict:
    timelines = {
        partition: [(e["round"], e["task"], d, 0.0) for e, d in zip(stream, decisions(stream, detector, parameter))]
        for partition, stream in streams.items()
    }
    found = score_detections(timelines)
    return {
        "switches": found["switches"], "recall1": found["detection_rate"], "recall2": found["detection_rate_within_2"],
        "delay": found["mean_delay_rounds"], "false_alarms": found["false_alarms"],
        "false_per_100": found["false_alarms_per_100"], "precision": found["precision"],
        "client_rounds": found["client_rounds"],
    }


def record_run(scenario: str, seed: int, data_dir: str, spread: int, out: Path, cache: Path | None) -> dict[int, list[dict]]:
    """One client stream per partition: recorded by a run, or read from ``cache`` when it
    holds this scenario, seed and spread already."""
    cached = cache / f"{scenario}-s{seed}-spread{spread}.pt" if cache else None
    if cached is not None and cached.exists():
        saved = torch.load(cached, weights_only=True)  # tensors and plain values only: nothing is unpickled
        return {int(p): [{**e, "evidence": _evidence_of(e["evidence"])} for e in s] for p, s in saved.items()}
    streams = _record(scenario, seed, data_dir, spread, out)
    if cached is not None:
        cache.mkdir(parents=True, exist_ok=True)
        plain = {p: [{**e, "evidence": e["evidence"].as_state() if e["evidence"] else None} for e in s]
                 for p, s in streams.items()}
        torch.save(plain, cached)
    return streams


def _evidence_of(state: dict | None) -> RoundEvidence | None:
    return None if state is None else RoundEvidence.from_state(state, state["input-mean"].numel())


def _record(scenario: str, seed: int, data_dir: str, spread: int, out: Path) -> dict[int, list[dict]]:
    preset, changes = SCENARIOS[scenario]
    settings = preset_settings(preset)
    settings.update(data_dir=data_dir, method="replay", async_spread=spread, quiet=True, seed=seed, out=str(out),
                    **changes)
    config = RunConfig.from_mapping(settings)
    with Recorder() as recorder:
        run_inprocess(config, vectorize=False)
    return recorder.streams()


def fresh_sample_check(scenario: str, seed: int, data_dir: str, spread: int) -> dict:
    """The input-shift test where every round brings new samples (an edge client's inbox), not
    the same task data again (the simulation): each round's evidence is 256 samples drawn
    afresh from the client's data of its current task. Scored like the runs; no training
    (the test reads only the inputs). Also the input-shift ratio's largest value between two
    rounds of one task and its smallest across a switch (the threshold lies between them)."""
    preset, changes = SCENARIOS[scenario]
    settings = preset_settings(preset)
    settings.update(data_dir=data_dir, async_spread=spread, seed=seed, **changes)
    config = RunConfig.from_mapping(settings)
    built = build_scenario(config.data, seed)
    rounds = config.data.num_tasks * config.data.rounds_per_task
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(built.input_shape), built.num_classes))
    g = torch.Generator().manual_seed(seed)
    streams: dict[int, list[dict]] = {}
    for partition in range(config.data.clients):
        for server_round in range(1, rounds + 1):
            task = built.task_of(partition, server_round)
            data = built.train_data(partition, task)
            pick = torch.randint(len(data), (256,), generator=g)
            sample = type(data)(data.x[pick], data.y[pick])
            streams.setdefault(partition, []).append(
                {"round": server_round, "task": task, "errors": None,
                 "evidence": gather_evidence(model, sample, torch.device("cpu"))})
    found = score(streams, "input-shift", 0.0)
    pairs = [(a["task"] == b["task"], input_shift_ratio(a["evidence"], b["evidence"]))
             for stream in streams.values() for a, b in zip(stream, stream[1:])]
    found["same_task_max_ratio"] = max(r for same, r in pairs if same)
    found["switch_min_ratio"] = min((r for same, r in pairs if not same), default=None)
    return found


def synthetic_check(seeds: int) -> list[dict]:
    """River's detectors on error-bit streams with one change point: abrupt (error rate 0.1 to
    0.5 at sample 2000) and gradual (0.1 to 0.5 over samples 2000-3000); recall within 500
    samples of the change and false alarms before it."""
    rows = []
    for kind in ("abrupt", "gradual"):
        for name, detector, parameter in CANDIDATES:
            if detector in ROUND_DETECTORS:
                continue
            found = early = 0
            delays = []
            for seed in range(seeds * 10):
                rng = random.Random(seed)
                bits = []
                for i in range(4000):
                    p = 0.1 if i < 2000 else 0.5
                    if kind == "gradual" and 2000 <= i < 3000:
                        p = 0.1 + 0.4 * (i - 2000) / 1000
                    bits.append(int(rng.random() < p))
                positions = DriftMonitor(detector, parameter or 0.01).update(torch.tensor(bits, dtype=torch.uint8))
                early += sum(1 for p in positions if p < 2000)
                late = [p - 2000 for p in positions if 2000 <= p < 2000 + (500 if kind == "abrupt" else 1500)]
                if late:
                    found += 1
                    delays.append(late[0])
            runs = seeds * 10
            rows.append({"stream": kind, "detector": name, "recall": found / runs,
                         "mean_delay_samples": sum(delays) / len(delays) if delays else None,
                         "false_alarms_per_stream": early / runs})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDTIDE_DATA_DIR", ""))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--spread", type=int, default=3, help="rounds by which a client's switch may lag")
    parser.add_argument("--synthetic-only", action="store_true")
    parser.add_argument("--cache", type=Path, help="keep the recorded streams here and reuse them (to compare "
                        "detectors again without training)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := [s for s in chosen if s not in SCENARIOS]:
        raise SystemExit(f"unknown scenario(s) {unknown}: choose from {', '.join(SCENARIOS)}")
    if not args.synthetic_only and not args.data_dir:
        raise SystemExit("--data-dir is needed (a folder with MNIST and Fashion-MNIST in IDX format)")
    console = Console(width=160, stderr=args.json)
    synthetic = synthetic_check(args.seeds)
    results: dict = {"synthetic": synthetic, "scenarios": {}}
    if not args.synthetic_only:
        with tempfile.TemporaryDirectory() as tmp:
            for scenario in chosen:
                per_seed = []
                for seed in range(args.seeds):
                    started = time.perf_counter()
                    streams = record_run(scenario, seed, args.data_dir, args.spread, Path(tmp) / f"{scenario}-{seed}",
                                         args.cache)
                    per_seed.append({name: score(streams, d, p) for name, d, p in CANDIDATES})
                    if scenario != "concept":  # its inputs never change: the test has nothing to find
                        per_seed[-1]["input-shift, fresh samples"] = fresh_sample_check(
                            scenario, seed, args.data_dir, args.spread)
                    console.print(f"{scenario} seed {seed}: {time.perf_counter() - started:.0f} s")
                results["scenarios"][scenario] = {name: _mean([s[name] for s in per_seed]) for name in per_seed[0]}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    _print_synthetic(console, synthetic)
    for scenario, rows in results["scenarios"].items():
        _print_scenario(console, scenario, rows, args.seeds, args.spread)


def _mean(scores: list[dict]) -> dict:
    out = {}
    for key in scores[0]:
        values = [s[key] for s in scores if s[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def _print_synthetic(console: Console, rows: list[dict]) -> None:
    table = Table(title="River's detectors on synthetic error streams (error rate 0.1 -> 0.5 at sample 2000)")
    for column in ("stream", "detector", "recall %", "mean delay (samples)", "false alarms per stream"):
        table.add_column(column, justify="right")
    for r in rows:
        delay = "-" if r["mean_delay_samples"] is None else f"{r['mean_delay_samples']:.0f}"
        table.add_row(r["stream"], r["detector"], f"{100 * r['recall']:.0f}", delay, f"{r['false_alarms_per_stream']:.2f}")
    console.print(table)


def _print_scenario(console: Console, scenario: str, rows: dict, seeds: int, spread: int) -> None:
    table = Table(title=f"{scenario} (spread {spread}), mean over {seeds} seed(s); label-free tests marked *")
    for column in ("detector", "switches", "recall 1 round %", "recall 2 rounds %", "mean delay", "false alarms",
                   "per 100 client-rounds", "precision %"):
        table.add_column(column, justify="right")
    for name, r in rows.items():
        label_free = any(name.startswith(t) for t in LABEL_FREE)
        table.add_row(name + (" *" if label_free else ""), f"{r['switches']:.0f}", f"{100 * r['recall1']:.1f}",
                      f"{100 * r['recall2']:.1f}", f"{r['delay']:.2f}", f"{r['false_alarms']:.1f}",
                      f"{r['false_per_100']:.2f}", "-" if r["precision"] is None else f"{100 * r['precision']:.1f}")
    console.print(table)
    fresh = rows.get("input-shift, fresh samples")
    if fresh:
        console.print(f"input-shift on fresh samples: largest ratio between two rounds of one task "
                      f"{fresh['same_task_max_ratio']:.2f}, smallest across a switch {fresh['switch_min_ratio']:.2f} "
                      f"(means over seeds; the threshold is {SHIFT_THRESHOLD:g})")


if __name__ == "__main__":
    main()
