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
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from rich.console import Console

from common.config import INPUT_SHAPE_KEY, NUM_CLASSES_KEY, SETTINGS_HASH_KEY, RunConfig
from common.errors import FedtideError
from common.metrics import summarize
from common.models import build_model
from common.scenarios import Scenario, build_scenario
from common.weights import freeze, load_initial_weights
from common.stream_metrics import client_recovery_rounds, early_accuracy, rounds_to_recover, score_detections
from server.checkpoint import CheckpointStore
from server.evaluation import TaskEvaluator, served_accuracy
from server.history import RunHistory
from server.node_names import NodeNames
from server.privacy import sample_dp_summary
from server.progress import RoundProgress, summary_table
from server.reply_metrics import SPENT
from server.release_delivery import ReleasedModelDelivery
from server.release_gate import ReleaseStep
from server.round_loop import run_rounds
from server.live_buffered import run_live_buffered
from server.timed_rounds import run_timed
from server.run_folder import RunFolder, default_run_dir
from server.run_lock import hold_run_folder
from server.secure_round import secure_round
from server.run_state import capture, check_settings, node_states, restore, run_settings
from server.strategy import run_strategy
from server.timing import PhaseTimes, TimedGrid

def client_config(config: RunConfig, scenario: Scenario) -> ConfigRecord:
    """What every client is sent with each round: its settings (``ClientSettings``: no
    server-only or fault-injection setting) with their digest, and the model's shape."""
    settings = config.client
    record: dict = settings.to_mapping()
    record[SETTINGS_HASH_KEY] = settings.digest()
    record[INPUT_SHAPE_KEY] = ",".join(str(d) for d in scenario.input_shape)
    record[NUM_CLASSES_KEY] = scenario.num_classes
    return ConfigRecord(record)


def run_federation(
    grid: Grid, config: RunConfig, console: Console | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run all tasks' rounds, write the run folder, print the summary; return the summary.

    A checkpoint is written after every completed round (``server.checkpoint``). With
    ``resume``, the run in ``config.run.out`` goes on after its last usable checkpoint: no
    finished round is redone or lost, and the numbers are those of an uninterrupted run.
    A grid that holds its nodes' state (the in-process runtimes: ``node_states`` and
    ``restore_node_states``) has it checkpointed too. The run holds its folder's lock
    (``server.run_lock``) throughout: FedtideError when another process runs there.
    """
    if not config.run.out:
        config = config.replace(out=str(default_run_dir(config)))
    folder = RunFolder(Path(config.run.out), resume=resume)
    with hold_run_folder(folder.path):
        return _federate(grid, config, folder, console, resume)


def _federate(grid: Grid, config: RunConfig, folder: RunFolder, console: Console | None, resume: bool) -> dict[str, Any]:
    started = time.perf_counter()
    times = PhaseTimes()
    nodes = grid if hasattr(grid, "node_states") else None
    grid = TimedGrid(grid, times)
    console = console or Console(stderr=True)
    folder.start(config)
    scenario = build_scenario(config.data, config.seed)
    history = RunHistory(scenario.schedule, NodeNames(folder.path))
    # one global model is released to devices; trainings that serve each node its own have no registry
    releases = (ReleaseStep(folder.path, config, release_exporter(config, scenario))
                if config.data.training in ("federated", "joint") else None)
    strategy = run_strategy(config, history, times,
                            extra_hooks=[ReleasedModelDelivery(releases.registry)] if releases else ())
    strategy.receipts.last_round = config.num_rounds
    secure = secure_round(config, strategy)
    if strategy.privacy is not None and (per_round := max(int(config.data.clients * config.server.fraction_train), 1)) < 100:
        console.print(f"[yellow]warning:[/] --dp client with {per_round} client(s) a round: the noise on their mean "
                      f"(std {config.privacy.dp_noise:g} x {config.privacy.dp_clip:g} / {per_round} per weight) swamps "
                      "what they learn; client-level DP needs hundreds of clients a round")
    evaluator = TaskEvaluator(config, scenario)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths, config.seed)
    if config.network.init_from:
        load_initial_weights(model, config.network.init_from)
    freeze(model, config.network.frozen_prefixes)  # fail here, before any round, if a prefix is wrong
    initial = ArrayRecord(model.state_dict())
    random.seed(config.seed)  # Flower samples nodes with the `random` module
    checkpoints = CheckpointStore(folder.path)
    if not resume:
        checkpoints.clear()  # an earlier run's (perhaps longer) checkpoints would be taken for ours
    runtime = {
        "node_states": nodes is not None, "vectorize": getattr(nodes, "vectorize", None),
        "workers": getattr(nodes, "workers", None),
    }
    settings = run_settings(config)
    arrays, first_round = initial, 1
    if config.server.speed_spread > 1 and nodes is None:
        raise FedtideError("--speed-spread simulates time in fedtide's own runtime: drop --engine flower (or "
                           "--speed-spread); with real nodes, time is real")
    if resume and config.server.timed and nodes is not None:
        raise FedtideError("a run in simulated time (--buffer-size or --speed-spread) cannot resume yet: start it again")
    if resume:
        arrays, first_round = _resume(checkpoints, config, runtime, nodes, strategy, history, console, secure)
        folder.rewrite_metrics(history)
        if releases is not None:
            releases.resume_after(first_round - 1)
        if not config.run.quiet:
            console.print(f"resuming {folder.path} after round {first_round - 1} of {config.num_rounds}")
    model_bytes = sum(len(a.data) for a in initial.values())
    watchers = start_watchers(config, history, folder.path, model_bytes)
    if watchers.page is not None and not config.run.quiet:
        console.print(f"status page: {watchers.page.url}")
    round_started = time.perf_counter()  # a tracker's store set-up is not the first round's time

    with watchers:  # closed however the run ends
        with RoundProgress(config.num_rounds, config.data.num_tasks, config.run.quiet, console, completed=first_round - 1) as progress:

            def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
                models = strategy.models_to_evaluate(arrays)
                with times.phase("evaluate"):
                    per_model = [evaluator(m.to_torch_state_dict()) for m in models]
                    accuracies = [float(np.mean(column)) for column in zip(*per_model)]
                    tasks = history.round_tasks()
                    served = served_accuracy(evaluator, strategy.served_models(arrays, list(tasks)), tasks,
                                             known=(models[0], accuracies) if len(models) == 1 else None)
                history.close_round(server_round, accuracies, time.perf_counter() - round_started, served)
                if releases is not None and server_round > 0:
                    history.rounds[-1].release = releases(server_round, history.rounds[-1].task, accuracies,
                                                          models[0].to_torch_state_dict())
                return MetricRecord({f"acc-task-{t}": a for t, a in enumerate(accuracies)})

            def after_round(server_round: int, arrays: ArrayRecord) -> None:
                """Checkpoint first: a crash between the two leaves metrics.jsonl a round short,
                and resuming rewrites it from the checkpoint. The watchers (metrics endpoint,
                status page, trackers) see the round before metrics.jsonl does, so whoever
                reads a round in the file finds it in every live view too."""
                nonlocal round_started
                states = nodes.node_states(changed_only=not checkpoints.full_nodes_next) if nodes is not None else None
                checkpoints.save(capture(server_round, arrays, strategy, history, states, runtime, settings, secure,
                                         node_ids=list(nodes.get_node_ids()) if nodes is not None else None))
                if nodes is not None:
                    nodes.mark_saved()
                if server_round > 0:
                    watchers.round_done(history.rounds[-1], grid)
                    folder.append_round(history.rounds[-1])
                    progress.round_done(history.rounds[-1])
                round_started = time.perf_counter()

            time_figures: dict[str, Any] = {}
            if config.server.buffer_size > 0 and nodes is None:  # real nodes: real time
                final = run_live_buffered(
                    strategy, grid, arrays, first_round=first_round, num_rounds=config.num_rounds,
                    timeout=config.server.round_timeout, buffer_size=config.server.buffer_size,
                    concurrency=config.effective_concurrency, train_config=client_config(config, scenario),
                    evaluate_fn=evaluate, after_round=after_round,
                )
            elif config.server.timed:
                final, time_figures = run_timed(
                    strategy, grid, arrays, speed_spread=config.server.speed_spread, seed=config.seed,
                    num_rounds=config.num_rounds, timeout=config.server.round_timeout,
                    buffer_size=config.server.buffer_size, concurrency=config.effective_concurrency,
                    train_config=client_config(config, scenario), evaluate_fn=evaluate, after_round=after_round,
                )
            else:
                final = run_rounds(
                    strategy,
                    grid,
                    arrays,
                    first_round=first_round,
                    num_rounds=config.num_rounds,
                    timeout=config.server.round_timeout,
                    train_config=client_config(config, scenario),
                    evaluate_config=client_config(config, scenario),
                    evaluate_fn=evaluate,
                    after_round=after_round,
                    stop_before=budget_stop(strategy, config),
                    train_round=secure,
                )

        summary = summarize_run(config, scenario, history, model_bytes=model_bytes)
        breakdown = times.breakdown()
        summary.update(
            threads=torch.get_num_threads(),  # torch's threads in the server's process
            wall_seconds=time.perf_counter() - started,
            run_dir=str(folder.path),
            phase_seconds=breakdown,
            round_seconds=(breakdown["total"] - breakdown["overhead"]) / max(len(history.rounds), 1),
        )
        summary.update(strategy.run_summary())
        if secure is not None:
            summary.update(secure.summary())
        if config.privacy.dp == "sample":
            summary.update(sample_dp_summary(config.privacy, history.rounds))
        summary.update(releases.summary() if releases is not None else {"releases": None})
        summary.update(time_figures)
        if "mean_clusters" in summary:  # every cluster's model goes down (beside `arrays`), one update up
            summary["bytes_per_client_round"] = int((summary["mean_clusters"] + 2) * summary["bytes_per_client_round"] / 2)
        summary.update(watchers.figures())
        folder.write_results(history, summary, final.to_torch_state_dict(), config)
        watchers.finish(summary, folder.path)
        if not config.run.quiet:
            console.print(summary_table(summary))
    return summary


def budget_stop(strategy: Any, config: RunConfig):
    """With ``--target-epsilon``: why the run stops before a round (its budget would pass the
    target), else None; None when there is no target."""
    if config.privacy.dp == "sample" and config.privacy.target_epsilon:
        return clients_spent(strategy.history, config.privacy.target_epsilon)
    privacy = strategy.privacy
    if privacy is None or not privacy.target_epsilon:
        return None
    rate = min(1.0, max(int(config.data.clients * config.server.fraction_train), 1) / config.data.clients)

    def stop(server_round: int) -> str | None:
        if privacy.next_round_exceeds(rate):
            return (f"another round would spend more than --target-epsilon {privacy.target_epsilon:g} "
                    f"(spent: {privacy.epsilon():.3f} at delta {privacy.delta:g})")
        return None

    return stop


def clients_spent(history: Any, target: float):
    """``--dp sample`` with ``--target-epsilon``: each client stops itself before its budget
    would pass the target; the run stops after a round that kept no reply, once every node
    that ever replied has said its budget is spent."""

    def stop(server_round: int) -> str | None:
        last = history.rounds[-1] if history.rounds else None
        if last is None or last.clients or not last.rejected:
            return None
        seen, spent = set(), set()  # nodes by name, over the whole run: a round may sample only spent ones
        for record in history.rounds:
            seen |= {c.get("name", c["node"]) for c in record.clients} | {r.get("name", r["node"]) for r in record.rejected}
            spent |= {r.get("name", r["node"]) for r in record.rejected if SPENT in r["reason"]}
        if seen != spent:
            return None
        return (f"every client that replied in round {last.server_round} would pass --target-epsilon {target:g} "
                f"with another round (largest spent: {last.epsilon or 0:.3f})")

    return stop


class Watchers:
    """What watches the live run from outside (Prometheus, the status page, the trackers), told
    of each round and of the finished run; closed when the run ends, however it ends."""

    def __init__(self, watchers: list[Any], page: Any = None) -> None:
        self.watchers = watchers
        self.page = page  # the status page, when served
        self.seconds = {type(w).__name__: 0.0 for w in watchers}  # time each spent on rounds: its cost

    def round_done(self, record: Any, grid: Grid) -> None:
        if not self.watchers:
            return
        try:
            connected: int | None = len(list(grid.get_node_ids()))
        except Exception:  # a grid that cannot say: the gauge keeps its last value
            connected = None
        for watcher in self.watchers:
            started = time.perf_counter()
            self._guarded(watcher, "round_done", record, connected)
            self.seconds[type(watcher).__name__] += time.perf_counter() - started

    @staticmethod
    def _guarded(watcher: Any, step: str, *args: Any) -> None:
        """A watcher that fails (a tracking server gone, a full disk) is logged; the run goes on."""
        try:
            getattr(watcher, step)(*args)
        except Exception as err:
            logging.getLogger("fedtide").warning("%s: %s failed: %s", type(watcher).__name__, step, str(err)[:200])

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """The run's figures and files, once its folder is written (the trackers log them)."""
        for watcher in self.watchers:
            if hasattr(watcher, "finish"):
                self._guarded(watcher, "finish", summary, run_dir)

    def figures(self) -> dict[str, Any]:
        """Seconds each watcher spent on the rounds, and on setting up its store (MLflow's)."""
        setup = [w.setup_seconds for w in self.watchers if hasattr(w, "setup_seconds")]
        return {**({"watcher_seconds": self.seconds} if self.watchers else {}),
                **({"tracking_setup_seconds": sum(setup)} if setup else {})}

    def __enter__(self) -> "Watchers":
        return self

    def __exit__(self, *exc: Any) -> None:
        for watcher in self.watchers:  # each closed on its own: one that fails does not keep the others open
            self._guarded(watcher, "close")


def start_watchers(config: RunConfig, history: RunHistory, run_dir: Path, model_bytes: int) -> Watchers:
    """The run's watchers (``--metrics-address``: Prometheus; ``--serve``: the status page;
    ``--track``: TensorBoard, MLflow), started (addresses bound, stores opened) before the next
    round; the page shows the rounds so far."""
    watchers: list[Any] = []
    page = None
    try:
        if config.run.track:
            from server.tracking import parse_trackers, start_trackers

            watchers += start_trackers(parse_trackers(config.run.track), config.run.track_uri, run_dir,
                                       config.to_mapping(), model_bytes)
        if config.run.metrics_address:
            from server.prometheus_metrics import PrometheusMetrics

            watchers.append(PrometheusMetrics(config.run.metrics_address, config.data.num_tasks))
        if config.run.serve:
            from server.status_page import StatusPage

            page = StatusPage(config.run.serve, config.to_mapping(), config.num_rounds, config.data.num_tasks,
                              history.rounds)
            watchers.append(page)
    except BaseException:
        for watcher in watchers:
            watcher.close()
        raise
    return Watchers(watchers, page)


def release_exporter(config: RunConfig, scenario: Scenario):
    """What writes a released version for edge inference (``--export-releases``), or None:
    the file, its size and its accuracy on every task's test set before and after export."""
    fmt = config.release.export_releases
    if fmt == "none":
        return None
    from common.datasets import LabelledSplit
    from common.export import export_model, require_onnx

    if fmt == "onnx":
        require_onnx(None)  # before the first round, not at the first release
    tests = [scenario.test_data(t) for t in range(scenario.num_tasks)]
    union = LabelledSplit(torch.cat([s.x for s in tests]), torch.cat([s.y for s in tests]))

    def export(weights: dict[str, torch.Tensor], out: Path) -> dict[str, Any]:
        model = build_model(config.network.model, scenario.input_shape, scenario.num_classes,
                            config.network.hidden_widths, config.seed)
        model.load_state_dict(weights)
        original, written = export_model(model.eval(), union, fmt, out)
        return {"file": out.name, "format": fmt, "bytes": written.size_bytes,
                "accuracy_before": original.accuracy, "accuracy_after": written.accuracy}

    return export


def _resume(
    checkpoints: CheckpointStore, config: RunConfig, runtime: dict[str, Any], nodes: Any, strategy: Any,
    history: RunHistory, console: Console, secure: Any = None,
) -> tuple[ArrayRecord, int]:
    """The global model and the first round to run, with strategy, history, RNGs and (in
    simulation) every node's state as the last usable checkpoint left them."""
    checkpoint = checkpoints.latest(warn=lambda message: console.print(f"[yellow]warning:[/] {message}"))
    check_settings(checkpoint.meta.get("settings"), config, f"config.json of {checkpoints.folder.parent}")
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
    states = (node_states(checkpoint) or {}) if nodes is not None else {}
    if nodes is not None and set(states) != set(ids := list(nodes.get_node_ids())):
        raise FedtideError(f"the checkpoint holds the states of {len(states)} clients, this simulation has "
                           f"{len(ids)}: resume it with the clients it was started with")
    arrays = restore(checkpoint, strategy, history, secure)
    checkpoints.continue_after(checkpoint)
    if nodes is not None:
        nodes.restore_node_states(states)
    return arrays, checkpoint.server_round + 1


def summarize_run(config: RunConfig, scenario: Scenario, history: RunHistory, model_bytes: int) -> dict[str, Any]:
    """Every figure of a finished run that the summary, the bench and the table report.

    Figures that need a metric no client reported (a plain Flower client sends only
    ``num-examples``) are None, and ``unavailable`` (present only then) says why, one
    ``"figure: reason"`` line each.
    """
    matrix = history.accuracy_matrix
    stopped_early = bool(history.rounds) and history.rounds[-1].server_round < config.num_rounds
    if stopped_early and len(matrix) < config.data.num_tasks:  # a budget spent mid-task: the model as it stands
        matrix = matrix + [history.rounds[-1].task_accuracies]
    schedule = scenario.schedule
    curves = [[history.baseline[t]] + [r.task_accuracies[t] for r in history.rounds] for t in range(config.data.num_tasks)]
    recover = [
        rounds_to_recover(curves[t], schedule.start_round(t), schedule.end_round(t))
        for t in range(1, config.data.num_tasks)
    ]
    recover = [r for r in recover if r is not None]
    early = [early_accuracy(curves[t], schedule.start_round(t)) for t in range(1, config.data.num_tasks)]
    early = [e for e in early if e is not None]
    client_figures, unavailable = _client_figures(history)
    if config.data.scenario == "distributed-drift":
        unavailable.append("acc, bwt, fwt, forgetting: concepts recur, so the accuracy matrix is read at the run's end "
                           "and says little here; served_acc is the figure")
    served = [r.served_acc for r in history.rounds if r.served_acc is not None]
    return {
        "method": config.methods.method,
        "scenario": config.data.scenario,
        "dataset": config.data.dataset,
        "strategy": config.server.strategy,
        "training": config.data.training,
        "seed": config.seed,
        "rounds": len(history.rounds),
        "accuracy_matrix": matrix,
        "baseline": history.baseline,
        "final_task_accuracies": history.rounds[-1].task_accuracies if history.rounds else [],
        "final_prequential_acc": client_figures["final_prequential_acc"],
        "rounds_to_recover": float(np.mean(recover)) if recover else None,
        "new_task_early_acc": float(np.mean(early)) if early else None,
        "client_rounds_to_recover": client_figures["client_rounds_to_recover"],
        "rejected_replies": len(history.rejects),
        "drift_events": client_figures["drift_events"],
        "drift_detection": client_figures["drift_detection"],
        "served_acc": float(np.mean(served)) if served else None,
        "final_served_acc": served[-1] if served else None,
        "bytes_per_client_round": 2 * model_bytes,  # the model down, the update up
        **({"stopped_at_round": history.rounds[-1].server_round} if stopped_early else {}),
        **summarize(matrix, history.baseline[: len(matrix)]),
        **({"unavailable": unavailable} if unavailable else {}),
    }


# the summary's figures that come from clients' reply metrics, and the metrics each needs
CLIENT_FIGURE_METRICS = {
    "final_prequential_acc": ("prequential-acc",),
    "client_rounds_to_recover": ("task-id", "prequential-acc"),
    "drift_events": ("drift-detected",),
    "drift_detection": ("task-id", "drift-detected"),
}


def _client_figures(history: RunHistory) -> tuple[dict[str, Any], list[str]]:
    """The figures of ``CLIENT_FIGURE_METRICS`` (None where unavailable) and why each
    unavailable one is."""
    last = history.rounds[-1].clients if history.rounds else []
    reporting = [c for c in last if "prequential-acc" in c]
    weights = sum(c["num-examples"] for c in reporting)
    timelines = history.client_timelines()
    figures = {
        "final_prequential_acc": (
            sum(c["prequential-acc"] * c["num-examples"] for c in reporting) / weights if weights else None
        ),
        "client_rounds_to_recover": client_recovery_rounds(timelines),
        "drift_events": len(history.drift_events),
        "drift_detection": score_detections(timelines),
    }
    unavailable = []
    for figure, metrics in CLIENT_FIGURE_METRICS.items():
        missing = [m for m in metrics if not history.reported(m)]
        if missing:
            figures[figure] = None
            unavailable.append(f"{figure}: no client reported {' or '.join(missing)}")
    if not weights and history.reported("prequential-acc"):  # e.g. every reply of the last round rejected
        unavailable.append("final_prequential_acc: no reply accepted in the last round reported prequential-acc")
    return figures, unavailable


def quiet_flower_logs() -> None:
    """Flower logs every round at INFO (and warns that federated evaluation is off);
    our progress bar and summary say the same in less space."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
