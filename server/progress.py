"""What a person watches during a run: a progress bar per round (one plain line per round when
the output is not a terminal: a log file, a service manager's journal), a table at the end."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from server.history import RoundRecord


class RoundProgress:
    def __init__(
        self, total_rounds: int, num_tasks: int, quiet: bool, console: Console | None = None, completed: int = 0
    ) -> None:
        """``completed``: rounds done before this process started (a resumed run): they count
        on the bar but not in its rate."""
        self.quiet = quiet
        self.num_tasks = num_tasks
        self.total_rounds = total_rounds
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._lines = not quiet and not self.console.is_terminal
        if not quiet and not self._lines:
            self._progress = Progress(
                TextColumn("[bold]rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("", total=total_rounds, completed=completed, rate="")

    def __enter__(self) -> "RoundProgress":
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress:
            self._progress.stop()

    def round_done(self, record: RoundRecord) -> None:
        if self._lines:
            print(round_line(record, self.total_rounds, self.num_tasks), file=self.console.file, flush=True)
        if not self._progress:
            return
        loss = record.train.get("train-loss", float("nan"))
        acc = record.as_json()["accuracy_seen_tasks"]
        note = f" [red]{len(record.rejected)} rejected[/]" if record.rejected else ""
        drifting = sum(1 for c in record.clients if c.get("drift-detected"))
        note += f" [yellow]drift on {drifting} client(s)[/]" if drifting else ""
        if record.epsilon is not None:
            note += f"  ε {record.epsilon:.2f}"
        if record.release.get("released") is not None:
            note += f"  released v{record.release['released']}" + ("" if "release" in record.release else " [dim](held)[/]")
        self._progress.update(
            self._task,
            advance=1,
            description=f"task {record.task + 1}/{self.num_tasks}  loss {loss:.3f}  acc {100 * acc:5.1f}%{note}",
        )
        speed = self._progress.tasks[0].speed
        if speed:
            self._progress.update(self._task, rate=f"{speed:.2f} rounds/s")


SHOWN_NAMES = 8  # nodes named in a round's line; more are counted


def round_line(record: RoundRecord, total_rounds: int, num_tasks: int) -> str:
    """One line for a log: round, who replied and who failed (by name where known), accuracy,
    loss and time."""
    acc = record.as_json()["accuracy_seen_tasks"]
    loss = record.train.get("train-loss")
    parts = [f"round {record.server_round}/{total_rounds}", f"task {record.task + 1}/{num_tasks}",
             _who(f"{len(record.clients)} replied", record.clients)]
    if record.rejected:
        parts.append(_who(f"{len(record.rejected)} failed", record.rejected))
    parts += [f"acc {100 * acc:.1f}%", *([f"loss {loss:.3f}"] if loss is not None else []), f"{record.seconds:.1f} s"]
    if record.epsilon is not None:
        parts.append(f"epsilon {record.epsilon:.3f}")
    if record.release.get("released") is not None:
        parts.append(f"released v{record.release['released']}" + (" (new)" if "release" in record.release else ""))
    if record.aggregation:
        parts.append("model kept: " + str(record.aggregation.get("skipped", ""))[:80])
    return " | ".join(parts)


def _who(count: str, entries: list[dict[str, Any]]) -> str:
    names = [str(e["name"]) for e in entries if "name" in e]
    if not names:
        return count
    more = f", +{len(names) - SHOWN_NAMES}" if len(names) > SHOWN_NAMES else ""
    return f"{count} ({', '.join(names[:SHOWN_NAMES])}{more})"


NOT_AVAILABLE = "n/a"  # a figure that needs a metric no client reported (summary["unavailable"] says which)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"fedtide: {summary['method']} on {summary['scenario']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("ACC (avg accuracy, %)", f"{100 * summary['acc']:.2f}")
    table.add_row("BWT (backward transfer, pts)", f"{100 * summary['bwt']:+.2f}")
    table.add_row("FWT (forward transfer, pts)", f"{100 * summary['fwt']:+.2f}")
    table.add_row("Forgetting (avg, pts)", f"{100 * summary['forgetting']:.2f}")
    final = ", ".join(f"{100 * a:.1f}" for a in summary["final_task_accuracies"])
    table.add_row("final accuracy per task (%)", final)
    table.add_row("rounds", str(summary["rounds"]))
    table.add_row("rejected replies", str(summary["rejected_replies"]))
    detection = summary["drift_detection"]
    table.add_row(
        "drift detection",
        NOT_AVAILABLE if detection is None else (
            f"{detection['detected']}/{detection['switches']} switches within 1 round, "
            f"{detection['false_alarms']} false alarms ({detection['false_alarms_per_100']:.1f} per 100 client-rounds)"
        ),
    )
    if summary.get("drift_reports_denied"):
        table.add_row("drift reports not acted on (no evidence, or more than the median node's)",
                      f"{summary['drift_reports_denied']} of {summary['drift_reports_denied'] + summary['drift_reports_credited']}")
    if summary.get("rounds_to_recover") is not None:
        table.add_row("rounds to learn a new task (90% of best)", f"{summary['rounds_to_recover']:.1f}")
    if summary.get("served_acc") is not None:
        table.add_row("served accuracy: each client's model on its task, mean over rounds / last (%)",
                      f"{100 * summary['served_acc']:.2f} / {100 * summary['final_served_acc']:.2f}")
    if summary.get("clusters") is not None:
        table.add_row("models (clusters): at the end / mean; spawned, merged",
                      f"{summary['clusters']} / {summary['mean_clusters']:.1f}; {summary['cluster_spawns']}, "
                      f"{summary['cluster_merges']}")
    if summary.get("simulated_seconds") is not None:
        table.add_row("simulated time (s; one round: the slowest client's) / model updates",
                      f"{summary['simulated_seconds']:.0f} ({summary['round_seconds']:.1f}) / {summary['model_updates']}")
    if summary.get("dp"):
        dp = summary["dp"]
        level = "sample-level DP-SGD, the largest client's" if dp.get("level") == "sample" else "client-level DP"
        table.add_row(f"privacy: {level} (epsilon, delta); noise z, clip C",
                      f"({dp['epsilon']:.3f}, {dp['delta']:g}); z {dp['noise_multiplier']:g}, C {dp['clip']:g}")
    if summary.get("secure_aggregation"):
        secure = summary["secure_aggregation"]
        table.add_row("secure aggregation (SecAgg+): KB down / up per client and round; rounds that failed",
                      f"{secure['bytes_down_per_client_round'] / 1000:.1f} / {secure['bytes_up_per_client_round'] / 1000:.1f}; "
                      f"{secure['failed_rounds']}")
    if summary.get("stopped_at_round"):
        table.add_row("stopped early (--target-epsilon) after round", str(summary["stopped_at_round"]))
    if summary.get("releases"):
        held = summary["gate_held_rounds"]
        table.add_row("released versions / served at the end (round) / rounds the gate held",
                      f"{summary['releases']} / v{summary['released_version']} ({summary['released_round']}) / {len(held)}")
    prequential = summary["final_prequential_acc"]
    table.add_row("final prequential accuracy (%)", NOT_AVAILABLE if prequential is None else f"{100 * prequential:.2f}")
    table.add_row("wall time (s)", f"{summary['wall_seconds']:.1f}")
    phases = summary.get("phase_seconds")
    if phases:
        table.add_row(
            "time: train / aggregate / evaluate / overhead (s)",
            " / ".join(f"{phases[k]:.1f}" for k in ("train", "aggregate", "evaluate", "overhead")),
        )
    table.add_row("run folder", summary["run_dir"])
    if summary.get("unavailable"):
        table.caption = f"{NOT_AVAILABLE}: " + "; ".join(summary["unavailable"])
    return table
