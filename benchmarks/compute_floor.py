"""W2's compute floor on this machine: how long its matrix products alone must take.

Counts the multiply-adds W2 trains and tests from its real split (every client's samples
per task, each batch joined by as many memories once a task has passed; the test of the
global model on every task before round 1 and after each of the 25 rounds, as fedtide
reports them), then times those products at W2's shapes on this CPU, with the threads
fedtide would use: batched ``baddbmm``/``bmm`` of 10 clients' 64-row batches for training
(the first task's 32-row batches, new samples only, counted at that rate), ``linear`` on
1,000 rows for testing. Their
sum is the least time fedtide's W2 needs here, before data handling, start-up or Python.
(The plain loop tests after each task only, 5 times: its own floor is about 1 s lower.)

Usage: python benchmarks/compute_floor.py --data-dir ../shared/datasets [--rounds-per-task 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common.scenarios import build_scenario  # noqa: E402
from replay_loop import w2_config  # noqa: E402


def layer_shapes(input_size: int, hidden: tuple[int, ...], classes: int) -> list[tuple[int, int]]:
    sizes = [input_size, *hidden, classes]
    return list(zip(sizes[:-1], sizes[1:]))


def forward_macs_per_sample(shapes: list[tuple[int, int]]) -> int:
    return sum(i * o for i, o in shapes)


def training_macs_per_sample(shapes: list[tuple[int, int]]) -> int:
    """Forward, weight gradient, and the input gradient of every layer but the first."""
    return 2 * forward_macs_per_sample(shapes) + forward_macs_per_sample(shapes[1:])


def w2_counts(data_dir: str, rounds_per_task: int) -> dict:
    config = w2_config(data_dir, rounds_per_task=rounds_per_task)
    scenario = build_scenario(config.data, config.seed)
    seen = [False] * config.data.clients  # a client replays once a past task gave it samples
    trained = 0
    for task in range(scenario.num_tasks):
        for client in range(config.data.clients):
            n = len(scenario.train_data(client, task))
            trained += rounds_per_task * config.learner.local_epochs * n * (2 if seen[client] else 1)
        for client in range(config.data.clients):
            seen[client] = seen[client] or len(scenario.train_data(client, task)) > 0
    tested_per_round = sum(len(scenario.test_data(t)) for t in range(scenario.num_tasks))
    rounds = scenario.num_tasks * rounds_per_task
    input_size = math.prod(scenario.input_shape)
    return {"trained_samples": trained, "tested_samples": (rounds + 1) * tested_per_round,
            "shapes": layer_shapes(input_size, config.network.hidden_widths, scenario.num_classes)}


def _seconds(step, repeats: int) -> float:
    step()  # warm: first calls pick kernels and touch memory
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def training_rate(shapes: list[tuple[int, int]], clients: int = 10, rows: int = 64) -> float:
    """Multiply-adds per second of one batched SGD step's products, as fedtide's fused step runs them."""
    weights = [torch.randn(clients, i, o) * 0.01 for i, o in shapes]
    biases = [torch.zeros(clients, 1, o) for _, o in shapes]
    x = torch.randn(clients, rows, shapes[0][0])

    def step() -> None:
        inputs, h = [x], x
        for w, b in zip(weights, biases):
            h = torch.baddbmm(b, h, w)
            inputs.append(h)
        grad = h
        for i in reversed(range(len(weights))):
            below = torch.bmm(grad, weights[i].transpose(1, 2)) if i > 0 else None
            weights[i].baddbmm_(inputs[i].transpose(1, 2), grad, alpha=-1e-6)
            grad = below

    return clients * rows * training_macs_per_sample(shapes) / _seconds(step, 50)


def testing_rate(shapes: list[tuple[int, int]], rows: int = 1000) -> float:
    weights = [torch.randn(o, i) * 0.01 for i, o in shapes]
    biases = [torch.zeros(o) for _, o in shapes]
    x = torch.randn(rows, shapes[0][0])

    def forward() -> None:
        h = x
        for w, b in zip(weights, biases):
            h = torch.nn.functional.linear(h, w, b)

    return rows * forward_macs_per_sample(shapes) / _seconds(forward, 20)


def floor(data_dir: str, rounds_per_task: int = 5) -> dict:
    counts = w2_counts(data_dir, rounds_per_task)
    shapes = counts["shapes"]
    train_macs = counts["trained_samples"] * training_macs_per_sample(shapes)
    test_macs = counts["tested_samples"] * forward_macs_per_sample(shapes)
    train_rate, test_rate = training_rate(shapes), testing_rate(shapes)
    return {
        "threads": torch.get_num_threads(), "trained_samples": counts["trained_samples"],
        "tested_samples": counts["tested_samples"], "train_tflop": 2 * train_macs / 1e12,
        "test_tflop": 2 * test_macs / 1e12, "train_gflops": 2 * train_rate / 1e9, "test_gflops": 2 * test_rate / 1e9,
        "train_seconds": train_macs / train_rate, "test_seconds": test_macs / test_rate,
        "floor_seconds": train_macs / train_rate + test_macs / test_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the folder with MNIST's IDX files")
    parser.add_argument("--rounds-per-task", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = floor(args.data_dir, args.rounds_per_task)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"W2 on {result['threads']} thread(s): training {result['train_tflop']:.2f} TFLOP at "
          f"{result['train_gflops']:.0f} GFLOPS = {result['train_seconds']:.1f} s; testing "
          f"{result['test_tflop']:.2f} TFLOP at {result['test_gflops']:.0f} GFLOPS = {result['test_seconds']:.1f} s; "
          f"floor {result['floor_seconds']:.1f} s")


if __name__ == "__main__":
    main()
