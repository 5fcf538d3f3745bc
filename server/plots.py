"""Per-task accuracy of the global model over rounds, with the task switches marked."""

from __future__ import annotations

from pathlib import Path

from common.svg_charts import Line, write_line_chart
from server.history import RunHistory


def plot_task_accuracy(history: RunHistory, path: Path) -> None:
    rounds = [0] + [r.server_round for r in history.rounds]
    lines = []
    for task in range(history.num_tasks):
        values = [history.baseline[task] if history.baseline else float("nan")]
        values += [r.task_accuracies[task] for r in history.rounds]
        lines.append(Line(f"task {task}", rounds, [100 * v for v in values]))
    write_line_chart(
        path,
        lines,
        title="global model accuracy per task (dotted: task switch, red: drift detected)",
        x_label="round",
        y_label="test accuracy (%)",
        y_range=(0, 100),
        dotted_xs=[history.schedule.start_round(task) - 0.5 for task in range(1, history.num_tasks)],
        markers=sorted({e["round"] for e in history.drift_events}),
        marker_label="drift reported by a client",
    )
