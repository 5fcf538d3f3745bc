"""A plain Flower ServerApp (FedAvg) for the continual clients: nothing fedtide-specific."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from continual_client.task import ROUNDS_PER_TASK, SETTINGS, TASKS, digits
from fedtide import ContinualLearner

app = ServerApp()
accuracies: list[float] = []  # accuracy on every digit after each round (read by the test)


@app.main()
def main(grid: Grid, context: Context) -> None:
    judge = ContinualLearner(SETTINGS, input_shape=(1, 8, 8), num_classes=10)
    x, y = digits()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = judge.evaluate(arrays.to_torch_state_dict(), x, y)
        accuracies.append(metrics["eval-acc"])
        print(f"round {server_round}: accuracy on all digits {100 * metrics['eval-acc']:.1f}%")
        return MetricRecord(metrics)

    nodes = len(list(grid.get_node_ids()))
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=nodes)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(judge.initial_weights()),
                   num_rounds=int(context.run_config.get("num-server-rounds", TASKS * ROUNDS_PER_TASK)),
                   evaluate_fn=evaluate)
