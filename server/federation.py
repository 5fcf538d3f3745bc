"""One federated continual-learning run, driven through any Flower ``Grid``.

The ServerApp, the in-process runtime and Flower's simulation engine all call
``run_federation``: the same strategy, the same evaluation, the same run folder.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from rich.console import Console

from common.config import RunConfig
from common.metrics import summarize
from common.models import build_model
from common.scenarios import build_scenario
from server.evaluation import TaskEvaluator
from server.history import RunHistory
from server.progress import RoundProgress, summary_table
from server.run_folder import RunFolder
from server.strategy import build_strategy

# settings only the server uses; clients get everything else with each round
SERVER_ONLY_KEYS = ("out", "quiet")


def client_config(config: RunConfig) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in config.to_mapping().items() if k not in SERVER_ONLY_KEYS})


def run_federation(grid: Grid, config: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Run all tasks' rounds, write the run folder, print the summary; return the summary."""
    started = time.perf_counter()
    console = console or Console(stderr=True)
    folder = RunFolder.for_config(config)
    folder.write_config(config)
    scenario = build_scenario(config)
    history = RunHistory(config.num_tasks, config.rounds_per_task)
    strategy = build_strategy(config, history)
    evaluator = TaskEvaluator(config, scenario)
    model = build_model(config.model, scenario.input_shape, scenario.num_classes, config.hidden_widths, config.seed)
    random.seed(config.seed)  # Flower samples nodes with the `random` module
    round_started = time.perf_counter()

    with RoundProgress(config.num_rounds, config.num_tasks, config.quiet, console) as progress:

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            nonlocal round_started
            accuracies = evaluator(arrays.to_torch_state_dict())
            record = history.close_round(server_round, accuracies, time.perf_counter() - round_started)
            round_started = time.perf_counter()
            if record is not None:
                folder.append_round(record)
                progress.round_done(record)
            return MetricRecord({f"acc-task-{t}": a for t, a in enumerate(accuracies)})

        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=config.num_rounds,
            train_config=client_config(config),
            evaluate_config=client_config(config),
            evaluate_fn=evaluate,
        )

    matrix = history.accuracy_matrix
    summary: dict[str, Any] = {
        "method": config.method,
        "scenario": config.scenario,
        "strategy": config.strategy,
        "seed": config.seed,
        "rounds": len(history.rounds),
        "accuracy_matrix": matrix,
        "baseline": history.baseline,
        "final_task_accuracies": history.rounds[-1].task_accuracies if history.rounds else [],
        "rejected_replies": len(history.rejects),
        "drift_events": len(history.drift_events),
        "wall_seconds": time.perf_counter() - started,
        "run_dir": str(folder.path),
        **summarize(matrix, history.baseline[: len(matrix)]),
    }
    folder.write_results(history, summary, result.arrays.to_torch_state_dict(), config)
    if not config.quiet:
        console.print(summary_table(summary))
    return summary


def quiet_flower_logs() -> None:
    """Flower logs every round at INFO (and warns that federated evaluation is off);
    our progress bar and summary say the same in less space."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
