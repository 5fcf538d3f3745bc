"""One federated continual-learning run, driven through any Flower ``Grid``.

The ServerApp, the in-process runtime and Flower's simulation engine all call
``run_federation``: the same strategy, the same evaluation, the same run folder.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from rich.console import Console

from common.config import INPUT_SHAPE_KEY, NUM_CLASSES_KEY, RunConfig
from common.errors import FedtideError
from common.metrics import summarize
from common.models import build_model
from common.scenarios import Scenario, build_scenario
from common.weights import freeze, load_initial_weights
from common.stream_metrics import client_recovery_rounds, early_accuracy, rounds_to_recover, score_detections
from server.checkpoint import CheckpointStore
from server.evaluation import TaskEvaluator
from server.history import RunHistory
from server.progress import RoundProgress, summary_table
from server.round_loop import run_rounds
from server.run_folder import RunFolder
from server.run_state import capture, node_states, restore
from server.strategy import build_strategy
from server.timing import PhaseTimes, TimedGrid

# settings only the server uses; clients get everything else with each round
SERVER_ONLY_KEYS = ("out", "quiet")


def client_config(config: RunConfig, scenario: Scenario) -> ConfigRecord:
    record = {k: v for k, v in config.to_mapping().items() if k not in SERVER_ONLY_KEYS}
    record[INPUT_SHAPE_KEY] = ",".join(str(d) for d in scenario.input_shape)
    record[NUM_CLASSES_KEY] = scenario.num_classes
    return ConfigRecord(record)


def run_federation(
    grid: Grid, config: RunConfig, console: Console | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run all tasks' rounds, write the run folder, print the summary; return the summary.

    A checkpoint is written after every completed round (``server.checkpoint``). With
    ``resume``, the run in ``config.out`` goes on after its last usable checkpoint: no
    finished round is redone or lost, and the numbers are those of an uninterrupted run.
    A grid that holds its nodes' state (the in-process runtimes: ``node_states`` and
    ``restore_node_states``) has it checkpointed too.
    """
    started = time.perf_counter()
    times = PhaseTimes()
    nodes = grid if hasattr(grid, "node_states") else None
    grid = TimedGrid(grid, times)
    console = console or Console(stderr=True)
    folder = RunFolder(Path(config.out), resume=True) if resume else RunFolder.for_config(config)
    if not resume:
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
    checkpoints = CheckpointStore(folder.path)
    if not resume:
        checkpoints.clear()  # an earlier run's (perhaps longer) checkpoints would be taken for ours
    runtime = {
        "node_states": nodes is not None, "vectorize": getattr(nodes, "vectorize", None),
        "workers": getattr(nodes, "workers", None),
    }
    arrays, first_round = initial, 1
    if resume:
        arrays, first_round = _resume(checkpoints, runtime, nodes, strategy, history, console)
        folder.rewrite_metrics(history)
        if not config.quiet:
            console.print(f"resuming {folder.path} after round {first_round - 1} of {config.num_rounds}")
    round_started = time.perf_counter()

    with RoundProgress(config.num_rounds, config.num_tasks, config.quiet, console, completed=first_round - 1) as progress:

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            models = getattr(strategy, "models_to_evaluate", lambda a: [a])(arrays)
            with times.phase("evaluate"):
                per_model = [evaluator(m.to_torch_state_dict()) for m in models]
            accuracies = [float(np.mean(column)) for column in zip(*per_model)]
            history.close_round(server_round, accuracies, time.perf_counter() - round_started)
            return MetricRecord({f"acc-task-{t}": a for t, a in enumerate(accuracies)})

        def after_round(server_round: int, arrays: ArrayRecord) -> None:
            """Checkpoint first: a crash between the two leaves metrics.jsonl a round short,
            and resuming rewrites it from the checkpoint."""
            nonlocal round_started
            states = nodes.node_states() if nodes is not None else None
            checkpoints.save(capture(server_round, arrays, strategy, history, states, runtime))
            if server_round > 0:
                folder.append_round(history.rounds[-1])
                progress.round_done(history.rounds[-1])
            round_started = time.perf_counter()

        final = run_rounds(
            strategy,
            grid,
            arrays,
            first_round=first_round,
            num_rounds=config.num_rounds,
            timeout=config.round_timeout,
            train_config=client_config(config, scenario),
            evaluate_config=client_config(config, scenario),
            evaluate_fn=evaluate,
            after_round=after_round,
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
    folder.write_results(history, summary, final.to_torch_state_dict(), config)
    if not config.quiet:
        console.print(summary_table(summary))
    return summary


def _resume(
    checkpoints: CheckpointStore, runtime: dict[str, Any], nodes: Any, strategy: Any, history: RunHistory,
    console: Console,
) -> tuple[ArrayRecord, int]:
    """The global model and the first round to run, with strategy, history, RNGs and (in
    simulation) every node's state as the last usable checkpoint left them."""
    checkpoint = checkpoints.latest(warn=lambda message: console.print(f"[yellow]warning:[/] {message}"))
    written = checkpoint.meta["runtime"]
    if written["node_states"] != runtime["node_states"]:
        made, now = ("a simulation", "`fedtide server`") if written["node_states"] else ("`fedtide server`", "a simulation")
        raise FedtideError(
            f"this run was made by {made}; it cannot go on in {now}: resume it the way it was started"
        )
    if written["vectorize"] != runtime["vectorize"]:  # batched training rounds differently
        how = "without --no-vectorize" if written["vectorize"] else "with --no-vectorize"
        raise FedtideError(f"this run was started {how}: resume it {how} too, or its numbers would change")
    if written.get("workers", runtime["workers"]) != runtime["workers"]:  # each worker batches its own clients
        raise FedtideError(
            f"this run was started with --workers {written['workers']}: resume it with that many (or without "
            "--workers), or its numbers would change in their last digits"
        )
    arrays = restore(checkpoint, strategy, history)
    checkpoints.continue_after(checkpoint)
    if nodes is not None:
        nodes.restore_node_states(node_states(checkpoint))
    return arrays, checkpoint.server_round + 1


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
