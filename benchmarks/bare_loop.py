"""The floor for workload W1: the same federated training as a plain PyTorch loop.

No Flower, no messages, no validation: for each round, every client copies the global
weights, runs one epoch of SGD over its samples (shuffled with the same seeds fedtide
uses), and the server averages the weights by sample count, then evaluates. The client
data comes from fedtide's scenario code so that all three runs train on the same samples.

Usage: python benchmarks/bare_loop.py --data-dir DIR [--clients 10 --samples 600 --rounds 20]
Prints one JSON object: round_seconds, final_acc, rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.config import RunConfig  # noqa: E402
from common.evaluation import accuracy  # noqa: E402
from common.models import build_model  # noqa: E402
from common.scenarios import build_scenario  # noqa: E402
from common.seeding import derive_seed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = RunConfig.of(
        dataset="mnist", data_dir=args.data_dir, num_tasks=1, clients=args.clients, client_samples=args.samples,
        iid=True, rounds_per_task=args.rounds, method="naive", hidden="200,200", local_epochs=1,
        batch_size=32, lr=0.05, seed=args.seed, drift_detector="none",
    )
    scenario = build_scenario(config.data, config.seed)
    device = torch.device("cpu")
    model = build_model("mlp", scenario.input_shape, scenario.num_classes, (200, 200), args.seed)
    global_weights = {k: v.clone() for k, v in model.state_dict().items()}
    test = scenario.test_data(0)
    started = time.perf_counter()
    for server_round in range(1, args.rounds + 1):
        total = {k: torch.zeros_like(v) for k, v in global_weights.items()}
        examples = 0
        for client in range(args.clients):
            data = scenario.train_data(client, 0)
            model.load_state_dict(global_weights)
            optimizer = torch.optim.SGD(model.parameters(), lr=config.learner.lr)
            generator = torch.Generator().manual_seed(derive_seed(args.seed, client, server_round))
            order = torch.randperm(len(data), generator=generator)
            model.train()
            for start in range(0, len(data), config.learner.batch_size):
                idx = order[start : start + config.learner.batch_size]
                loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            for k, v in model.state_dict().items():
                total[k] += v * len(data)
            examples += len(data)
        global_weights = {k: v / examples for k, v in total.items()}
        model.load_state_dict(global_weights)
        final_acc, _ = accuracy(model, test, device)
    seconds = time.perf_counter() - started
    print(json.dumps({"round_seconds": seconds / args.rounds, "final_acc": final_acc, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
