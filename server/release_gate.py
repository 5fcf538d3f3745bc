"""The release gate: a round's global model reaches the devices only if it does not regress.

A continual learner's newest model is not always its best: a bad round (hostile clients, a
diverging step, an abrupt drift) can wreck it, and in class-incremental learning a new task
can be learned at the price of the old ones. The gate judges each round's model (the
candidate) on the server's held-out test sets of every task seen so far, in points (percent):

1. its mean accuracy over the tasks seen must be at most ``tolerance`` below the **best
   release** on those tasks (every released version's accuracies are kept, so the best is
   taken over the same tasks): a release never drifts down step by step;
2. on the **current task** it must hold or improve on the released model (at most
   ``tolerance`` below it);
3. on **every older task** it may lose at most ``max_forget`` against the released model.

The first candidate with finite accuracies is released (there is nothing to regress from).
``--release every-round`` releases every candidate, ``manual`` none (an operator releases
with ``fedtide models release``); after a rollback the gate still judges and logs, but
releases only once an operator releases again. Every decision is logged with its numbers
(``RUN_DIR/models/decisions.jsonl``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import RunConfig
from common.sections import ReleaseSettings
from server.model_registry import ModelRegistry

log = logging.getLogger("fedtide.release")


@dataclass(frozen=True)
class Decision:
    """Whether the candidate passes, why not (one reason per rule it fails), and its numbers
    (points): the candidate's mean over the tasks seen, the best release's, and the released
    model's."""

    passed: bool
    reasons: tuple[str, ...]
    seen_acc: float
    best_release: float | None
    released_acc: float | None


def _points(values: list[float], tasks: range) -> float:
    return 100.0 * sum(values[t] for t in tasks) / len(tasks)


def judge(rule: ReleaseSettings, accuracies: list[float], task: int, released: list[float] | None,
          releases: list[list[float]]) -> Decision:
    """Judge a candidate with per-task ``accuracies`` (fractions, every task of the run) at
    ``task`` (tasks ``0..task`` are seen), against the ``released`` model's accuracies and
    every release's (``releases``)."""
    seen = range(task + 1)
    if not all(math.isfinite(a) for a in accuracies):
        return Decision(False, ("its accuracies are not finite",), float("nan"), None, None)
    mine = _points(accuracies, seen)
    if released is None:
        return Decision(True, (), mine, None, None)
    best = max(_points(r, seen) for r in releases)
    reasons = []
    if mine < best - rule.gate_tolerance:
        reasons.append(f"mean over tasks 0-{task} is {mine:.2f}%, more than {rule.gate_tolerance:g} points below the "
                       f"best release's {best:.2f}%")
    current_drop = 100 * (released[task] - accuracies[task])
    if current_drop > rule.gate_tolerance:
        reasons.append(f"current task {task} falls {current_drop:.2f} points against the released model")
    for old in range(task):
        drop = 100 * (released[old] - accuracies[old])
        if drop > rule.gate_max_forget:
            reasons.append(f"old task {old} falls {drop:.2f} points (more than {rule.gate_max_forget:g})")
    return Decision(not reasons, tuple(reasons), mine, best, _points(released, seen))


def settings_digest(config: RunConfig) -> str:
    """A short hash of the settings that decide what the run computes (not where it writes or
    who watches it): a candidate's provenance."""
    from server.run_state import run_settings

    text = json.dumps(run_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


Exporter = Callable[[dict[str, torch.Tensor], Path], dict[str, Any]]


class ReleaseStep:
    """After each round's evaluation: record the candidate, judge it, release it when the mode
    and the gate say so (and ``export`` it: weights and a file to write -> what to record), and
    log the decision. Returns what the round's record and the progress bar show
    (``released``: the version served now; ``release``: a new version)."""

    def __init__(self, run_dir: Path, config: RunConfig, export: Exporter | None = None) -> None:
        self.settings = config.release
        self.registry = ModelRegistry(run_dir, keep=config.release.keep_releases)
        self.digest = settings_digest(config)
        self.export = export

    def __call__(self, server_round: int, task: int, accuracies: list[float],
                 weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        with self.registry.open(create=True) as registry:
            registry.keep = self.settings.keep_releases
            candidate = self.registry.put_candidate(registry, weights, {
                "round": server_round, "task": task, "accuracies": list(accuracies), "settings": self.digest})
            current = registry.current
            decision = judge(self.settings, accuracies, task, None if current is None else current["accuracies"],
                             [v["accuracies"] for v in registry.versions])
            mode = self.settings.release
            release = registry.auto and (mode == "every-round" or (mode == "gate" and decision.passed))
            line: dict[str, Any] = {
                "round": server_round, "task": task, "sha256": candidate["sha256"], "mode": mode,
                "passed": decision.passed, "reasons": list(decision.reasons), "seen_acc": decision.seen_acc,
                "best_release": decision.best_release, "released_acc": decision.released_acc,
            }
            if release:
                newest = registry.last_number
                entry = self.registry.release_candidate(registry, how=mode)
                line["released"] = entry["version"]
                release = entry["version"] > newest  # weights released before are served again, not new
                if self.export is not None and "export" not in entry:
                    suffix = ".pt" if self.settings.export_releases == "torchscript" else ".onnx"
                    entry["export"] = self.export(weights, self.registry.folder / f"v{entry['version']:04d}{suffix}")
                log.debug("round %d: released version %d (%.2f%% over tasks 0-%d)", server_round, entry["version"],
                         decision.seen_acc, task)
            elif decision.passed or mode != "gate":
                line["held"] = "automatic releases paused by a rollback" if not registry.auto else f"--release {mode}"
            else:
                log.debug("round %d: release gate holds the model: %s", server_round, "; ".join(decision.reasons))
            self.registry.log(line)
            return {"released": registry.released, **({"release": line["released"]} if release else {})}

    def resume_after(self, last_round: int) -> None:
        self.registry.keep_rounds_until(last_round)

    def summary(self) -> dict[str, Any]:
        """The run's release figures: versions released, the one served at the end, and the
        rounds the gate held."""
        if not self.registry.exists():
            return {"releases": 0, "released_version": None}
        with self.registry.open() as registry:
            current = registry.current
        decisions = [d for d in self.registry.decisions() if "round" in d and not d.get("operator")]
        return {
            "releases": len(registry.versions),
            "released_version": registry.released,
            "released_round": None if current is None else current["round"],
            "gate_held_rounds": [d["round"] for d in decisions if not d["passed"]],
        }


def served_timeline(versions: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What devices were served, round by round, read from the registry's ``versions`` and the
    run's ``metrics.jsonl`` lines: per round, the raw global model's and the served version's
    mean accuracy over the tasks seen (points), and the best of the versions released so far
    on those same tasks. Rounds before the first release have no served figures."""
    by_number = {v["version"]: v for v in versions}
    released_so_far: list[dict[str, Any]] = []
    out = []
    for line in rounds:
        seen = range(line["task"] + 1)
        number = (line.get("release") or {}).get("released")
        served = by_number.get(number)
        if served is not None and served not in released_so_far:
            released_so_far.append(served)
        out.append({
            "round": line["round"], "task": line["task"], "raw": _points(line["task_accuracies"], seen),
            "version": number, "new": "release" in (line.get("release") or {}),
            "served": None if served is None else _points(served["accuracies"], seen),
            "best_release": max((_points(v["accuracies"], seen) for v in released_so_far), default=None),
        })
    return out
