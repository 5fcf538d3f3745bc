"""Per-task accuracy of the global model over rounds, with the task switches marked."""

from __future__ import annotations

from pathlib import Path

from common.figures import new_figure, write_png
from server.history import RunHistory


def plot_task_accuracy(history: RunHistory, path: Path) -> None:
    rounds = [0] + [r.server_round for r in history.rounds]
    fig = new_figure(figsize=(8, 4.5), dpi=110)
    ax = fig.add_subplot()
    for task in range(history.num_tasks):
        values = [history.baseline[task] if history.baseline else float("nan")]
        values += [r.task_accuracies[task] for r in history.rounds]
        ax.plot(rounds, [100 * v for v in values], marker=".", label=f"task {task}")
    for task in range(1, history.num_tasks):
        ax.axvline(history.schedule.start_round(task) - 0.5, color="grey", linestyle=":", linewidth=1)
    drift_rounds = sorted({e["round"] for e in history.drift_events})
    if drift_rounds:
        ax.scatter(drift_rounds, [97] * len(drift_rounds), marker="v", color="crimson", zorder=3,
                   label="drift reported by a client")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("global model accuracy per task (dotted: task switch, red: drift detected)")
    ax.legend(loc="lower left", fontsize="small", ncol=2)
    ax.grid(alpha=0.3)
    write_png(fig, path)
