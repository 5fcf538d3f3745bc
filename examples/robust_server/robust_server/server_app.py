"""A ServerApp of your own with fedtide's strategy: every reply is validated (names, shapes,
finite values, a bounded num-examples) before a robust rule aggregates the rest."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedtide import ServerSettings, build_strategy
from robust_server.task import accuracy, model

app = ServerApp()
accuracies: list[float] = []  # accuracy after each round (read by the test)
strategies: list = []  # the strategy used (read by the test: its history holds the rejected replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = ServerSettings(aggregation="median", max_num_examples=10_000)
    strategy = build_strategy(settings, min_nodes=len(list(grid.get_node_ids())))
    strategies.append(strategy)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        accuracies.append(accuracy(arrays.to_torch_state_dict()))
        print(f"round {server_round}: accuracy {100 * accuracies[-1]:.1f}%, replies dropped so far: "
              f"{len(strategy.history.rejects_so_far())}")
        return MetricRecord({"accuracy": accuracies[-1]})

    strategy.start(grid=grid, initial_arrays=ArrayRecord(model().state_dict()),
                   num_rounds=int(context.run_config.get("num-server-rounds", 3)), evaluate_fn=evaluate)
