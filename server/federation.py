"""One federated continual-learning run, driven through any Flower ``Grid``.

The ServerApp, the in-process runtime and Flower's simulation engine all call
``run_federation``: the same strategy, the same evaluation, the same run folder.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from rich.console import Console

from common.config import INPUT_SHAPE_KEY, NUM_CLASSES_KEY, RunConfig
from common.metrics import summarize
from common.models import build_model
from common.scenarios import Scenario, build_scenario
from common.weights import freeze, load_initial_weights
from common.stream_metrics import client_recovery_rounds, early_accuracy, rounds_to_recover, score_detections
from server.evaluation import TaskEvaluator
from server.history import RunHistory
from server.progress import RoundProgress, summary_table
from server.run_folder import RunFolder
from server.strategy import build_strategy
from server.grids import PatientGrid
from server.timing import PhaseTimes, TimedGrid

# settings only the server uses; clients get everything else with each round
SERVER_ONLY_KEYS = ("out", "quiet")


def client_config(config: RunConfig, scenario: Scenario) -> ConfigRecord:
    record = {k: v for k, v in config.to_mapping().items() if k not in SERVER_ONLY_KEYS}
    record[INPUT_SHAPE_KEY] = ",".join(str(d) for d in scenario.input_shape)
    record[NUM_CLASSES_KEY] = scenario.num_classes
    return ConfigRecord(record)


def run_federation(grid: Grid, config: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Run all tasks' rounds, write the run folder, print the summary; return the summary."""
    started = time.perf_counter()
    times = PhaseTimes()
    grid = TimedGrid(PatientGrid(grid, config.effective_min_clients, config.client_wait), times)
    console = console or Console(stderr=True)
    folder = RunFolder.for_config(config)
    folder.write_config(config)
    scenario = build_scenario(config)
    history = RunHistory(scenario.schedule)
    strategy = build_strategy(config, history, times)
    evaluator = TaskEvaluator(config, scenario)
    model = build_model(config.model, scenario.input_shape, scenario.num_classes, config.hidden_widths, config.seed)
    if config.init_from:
        load_initial_weights(model, config.init_from)
    freeze(model, config.frozen_prefixes)  # fail here, before any round, if a prefix is wrong
    initial = ArrayRecord(model.state_dict())
    random.seed(config.seed)  # Flower samples nodes with the `random` module
    round_started = time.perf_counter()

    with RoundProgress(config.num_rounds, config.num_tasks, config.quiet, console) as progress:

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            nonlocal round_started
            models = getattr(strategy, "models_to_evaluate", lambda a: [a])(arrays)
            with times.phase("evaluate"):
                per_model = [evaluator(m.to_torch_state_dict()) for m in models]
            accuracies = [float(np.mean(column)) for column in zip(*per_model)]
            record = history.close_round(server_round, accuracies, time.perf_counter() - round_started)
            round_started = time.perf_counter()
            if record is not None:
                folder.append_round(record)
                progress.round_done(record)
            return MetricRecord({f"acc-task-{t}": a for t, a in enumerate(accuracies)})

        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=config.num_rounds,
            timeout=config.round_timeout,
            train_config=client_config(config, scenario),
            evaluate_config=client_config(config, scenario),
            evaluate_fn=evaluate,
        )

    summary = summarize_run(config, scenario, history, model_bytes=sum(len(a.data) for a in initial.values()))
    breakdown = times.breakdown()
    summary.update(
        wall_seconds=time.perf_counter() - started,
        run_dir=str(folder.path),
        phase_seconds=breakdown,
        round_seconds=(breakdown["total"] - breakdown["overhead"]) / max(len(history.rounds), 1),
    )
    if hasattr(strategy, "boosted_rounds"):
        summary["boosted_rounds"] = strategy.boosted_rounds
    folder.write_results(history, summary, result.arrays.to_torch_state_dict(), config)
    if not config.quiet:
        console.print(summary_table(summary))
    return summary


def summarize_run(config: RunConfig, scenario: Scenario, history: RunHistory, model_bytes: int) -> dict[str, Any]:
    """Every figure of a finished run that the summary, the bench and the table report."""
    matrix = history.accuracy_matrix
    schedule = scenario.schedule
    curves = [[history.baseline[t]] + [r.task_accuracies[t] for r in history.rounds] for t in range(config.num_tasks)]
    recover = [
        rounds_to_recover(curves[t], schedule.start_round(t), schedule.end_round(t))
        for t in range(1, config.num_tasks)
    ]
    recover = [r for r in recover if r is not None]
    early = [early_accuracy(curves[t], schedule.start_round(t)) for t in range(1, config.num_tasks)]
    early = [e for e in early if e is not None]
    last = history.rounds[-1].clients if history.rounds else []
    weights = sum(c["num-examples"] for c in last)
    prequential = sum(c["prequential-acc"] * c["num-examples"] for c in last) / weights if weights else 0.0
    return {
        "method": config.method,
        "scenario": config.scenario,
        "dataset": config.dataset,
        "strategy": config.strategy,
        "training": config.training,
        "seed": config.seed,
        "rounds": len(history.rounds),
        "accuracy_matrix": matrix,
        "baseline": history.baseline,
        "final_task_accuracies": history.rounds[-1].task_accuracies if history.rounds else [],
        "final_prequential_acc": prequential,
        "rounds_to_recover": float(np.mean(recover)) if recover else None,
        "new_task_early_acc": float(np.mean(early)) if early else None,
        "client_rounds_to_recover": client_recovery_rounds(history.client_timelines()),
        "rejected_replies": len(history.rejects),
        "drift_events": len(history.drift_events),
        "drift_detection": score_detections(history.client_timelines()),
        "bytes_per_client_round": 2 * model_bytes,  # the model down, the update up
        **summarize(matrix, history.baseline[: len(matrix)]),
    }


def quiet_flower_logs() -> None:
    """Flower logs every round at INFO (and warns that federated evaluation is off);
    our progress bar and summary say the same in less space."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
