"""The reference for workload W2: federated replay as a plain PyTorch loop.

No Flower, no messages, no validation, no drift detection: each round every client copies
the global weights and runs its local epochs of SGD over its current task's samples (the
same samples and shuffles fedtide uses, from fedtide's scenario code); each batch of new
samples is joined by as many samples drawn uniformly from the client's memory; the server
averages the weights by sample count. A client's memory is a reservoir that takes a task's
samples when the task ends, so while a task is learned its memories are all of past tasks.
After each task the global model is tested on every task; ACC and BWT as fedtide reports them.

``--der ALPHA`` makes it dark experience replay: when a task ends, the global model labels the
memories that joined with its logits, and each replayed memory adds ALPHA times the squared
error between its logits and those (mean over memories and classes). ``--shift N`` moves each
replayed image by a fresh random offset of up to N pixels.

Usage: python benchmarks/replay_loop.py --data-dir DIR [--seed 0 --memory 200 --rounds-per-task 5
       --der 0.2 --shift 2]
Prints one JSON object: acc, bwt, seconds.
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
from common.metrics import average_accuracy, backward_transfer  # noqa: E402
from common.models import build_model  # noqa: E402
from common.scenarios import build_scenario  # noqa: E402
from common.seeding import derive_seed  # noqa: E402
from common.transforms import random_shifts  # noqa: E402


def w2_config(data_dir: str, seed: int = 0, memory: int = 200, rounds_per_task: int = 5) -> RunConfig:
    """W2: split-MNIST, 10 clients, Dirichlet alpha 1, 1 local epoch, batch 32, SGD lr 0.05, MLP 400-400."""
    return RunConfig.of(
        dataset="mnist", data_dir=data_dir, scenario="class-incremental", clients=10, alpha=1.0,
        rounds_per_task=rounds_per_task, method="replay", memory_size=memory, hidden="400,400", local_epochs=1,
        batch_size=32, lr=0.05, seed=seed,
    )


def run_loop(config: RunConfig, der: float = 0.0, shift: int = 0) -> dict:
    scenario = build_scenario(config.data, config.seed)
    clients, tasks = config.data.clients, scenario.num_tasks
    capacity, batch = config.methods.options["memory-size"], config.learner.batch_size
    model = build_model("mlp", scenario.input_shape, scenario.num_classes, config.network.hidden_widths, config.seed)
    global_weights = {k: v.clone() for k, v in model.state_dict().items()}
    memories = [{"x": None, "y": None, "z": None, "seen": 0} for _ in range(clients)]
    draws = [torch.Generator().manual_seed(derive_seed(config.seed, c, 99)) for c in range(clients)]
    shifts = [torch.Generator().manual_seed(derive_seed(config.seed, c, 98)) for c in range(clients)]
    matrix = []
    started = time.perf_counter()
    server_round = 0
    for task in range(tasks):
        for _ in range(config.data.rounds_per_task):
            server_round += 1
            total = {k: torch.zeros_like(v) for k, v in global_weights.items()}
            examples = 0
            for client in range(clients):
                data = scenario.train_data(client, task)
                memory = memories[client]
                model.load_state_dict(global_weights)
                optimizer = torch.optim.SGD(model.parameters(), lr=config.learner.lr)
                order = torch.randperm(len(data), generator=torch.Generator().manual_seed(
                    derive_seed(config.seed, client, server_round)))
                model.train()
                for _epoch in range(config.learner.local_epochs):
                    for start in range(0, len(data), batch):
                        idx = order[start : start + batch]
                        x, y = data.x[idx], data.y[idx]
                        slots = None
                        if memory["x"] is not None:
                            slots = torch.randint(0, len(memory["y"]), (len(idx),), generator=draws[client])
                            old = random_shifts(memory["x"][slots], shift, shifts[client])
                            x, y = torch.cat([x, old]), torch.cat([y, memory["y"][slots]])
                        logits = model(x)
                        loss = F.cross_entropy(logits, y)
                        if der and slots is not None:
                            loss = loss + der * F.mse_loss(logits[len(idx):], memory["z"][slots])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                for k, v in model.state_dict().items():
                    total[k] += v * len(data)
                examples += len(data)
            global_weights = {k: v / examples for k, v in total.items()}
        model.load_state_dict(global_weights)
        for client in range(clients):  # the task ended: its samples are offered to the reservoir
            written = _reservoir_add(memories[client], scenario.train_data(client, task), capacity, draws[client])
            if der:  # the global model labels the memories that joined; the others keep their logits
                memory = memories[client]
                z = torch.zeros(len(memory["y"]), scenario.num_classes) if memory["z"] is None else memory["z"]
                z = torch.cat([z, torch.zeros(len(memory["y"]) - len(z), scenario.num_classes)])
                if written:
                    with torch.no_grad():
                        z[written] = model(memory["x"][written])
                memory["z"] = z
        matrix.append([accuracy(model, scenario.test_data(t), torch.device("cpu"))[0] for t in range(tasks)])
    seconds = time.perf_counter() - started
    return {"acc": average_accuracy(matrix), "bwt": backward_transfer(matrix), "seconds": seconds}


def _reservoir_add(memory: dict, data, capacity: int, generator: torch.Generator) -> list[int]:
    """Offer ``data`` to the reservoir; the slots written."""
    if memory["x"] is None:
        memory["x"] = torch.zeros((0, *data.x.shape[1:]), dtype=data.x.dtype)
        memory["y"] = torch.zeros(0, dtype=data.y.dtype)
    xs, ys = list(memory["x"]), list(memory["y"])
    written = set()
    for i in range(len(data)):
        memory["seen"] += 1
        if len(ys) < capacity:
            written.add(len(ys))
            xs.append(data.x[i])
            ys.append(data.y[i])
        else:
            slot = int(torch.randint(0, memory["seen"], (1,), generator=generator))
            if slot < capacity:
                xs[slot], ys[slot] = data.x[i], data.y[i]
                written.add(slot)
    memory["x"], memory["y"] = torch.stack(xs), torch.stack(ys)
    return sorted(written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory", type=int, default=200)
    parser.add_argument("--rounds-per-task", type=int, default=5)
    parser.add_argument("--der", type=float, default=0.0, help="dark experience replay with this weight (0: replay)")
    parser.add_argument("--shift", type=int, default=0, help="move replayed images by up to N pixels")
    args = parser.parse_args()
    config = w2_config(args.data_dir, args.seed, args.memory, args.rounds_per_task)
    print(json.dumps(run_loop(config, args.der, args.shift)))


if __name__ == "__main__":
    main()
