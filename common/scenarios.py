"""Turn one labelled dataset into a sequence of tasks per client, and test sets per task.

Five kinds of drift:
- class-incremental: classes split into tasks (0-1, 2-3, ...), one shared output head;
- domain-incremental: the same labels, each task transforms the inputs (rotation or
  a fixed pixel permutation);
- concept-drift: the same inputs, each task remaps labels (what a label means changes);
- dataset-switch: tasks alternate between two datasets of the same shape (MNIST, then
  Fashion-MNIST, ...), sharing the ten output labels;
- distributed-drift: K concepts (label permutations; concept 0 keeps the labels), and each
  client moves between them at its own rounds, some back to a concept they had
  (``common.schedule``): clients hold different concepts at once. A client's stream is cut
  into one part per concept, which it trains on whenever it holds that concept.

Training data is partitioned across clients first (IID or Dirichlet), then each client's
part is cut into tasks, so no sample is seen in two tasks and no test sample is ever
trained on: test sets come from the dataset's held-out split only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.sections import DataSettings
from common.datasets import Dataset, LabelledSplit
from common.image_datasets import load_dataset
from common.errors import FedtideError
from common.partition import dirichlet_partition, iid_partition
from common.schedule import TaskSchedule
from common.transforms import pad_to, permute_pixels, rotate, standardize

MIN_SAMPLES_PER_CLIENT_TASK = 4


@dataclass(frozen=True)
class Task:
    """What task ``index`` does to the data. Exactly one of the fields is meaningful."""

    index: int
    classes: tuple[int, ...] | None = None  # class-incremental
    rotation: float | None = None  # domain-incremental, rotation
    permutation: torch.Tensor | None = None  # domain-incremental, permutation
    label_map: torch.Tensor | None = None  # concept drift: new_label = label_map[label]

    def apply(self, split: LabelledSplit) -> LabelledSplit:
        x, y = split.x, split.y
        if self.classes is not None:
            keep = torch.isin(y, torch.tensor(self.classes))
            return LabelledSplit(x[keep], y[keep])
        if self.rotation is not None:
            return LabelledSplit(rotate(x, self.rotation), y)
        if self.permutation is not None:
            return LabelledSplit(permute_pixels(x, self.permutation), y)
        if self.label_map is not None:
            return LabelledSplit(x, self.label_map[y])
        return split


class Scenario:
    """The tasks, each client's training data per task, and the test set of each task."""

    def __init__(self, data: DataSettings, seed: int, dataset: Dataset) -> None:
        self.data = data
        self.dataset = dataset
        self.num_tasks = data.num_tasks
        self.num_classes = dataset.num_classes
        self.input_shape = dataset.input_shape
        rng = np.random.default_rng(seed)
        if data.scenario == "dataset-switch":
            sources = [dataset, _second_dataset(data, dataset)]
            self.tasks = [Task(i) for i in range(data.num_tasks)]
            self._client_tasks = _split_switch(data, sources, rng)
            self._test = [sources[t % 2].test for t in range(data.num_tasks)]
        else:
            self.tasks = _make_tasks(data, dataset, rng)
            self._client_tasks = _split_clients(data, dataset, self.tasks, rng)
            self._test = [task.apply(dataset.test) for task in self.tasks]
        self._prepare_inputs(data, dataset)
        self._joint: dict[int, LabelledSplit] = {}
        distributed = data.scenario == "distributed-drift"
        self.schedule = TaskSchedule.build(
            data.num_tasks, data.rounds_per_task, data.clients, data.async_spread, seed,
            switches=data.concept_switches if distributed else None, recur=data.concept_recur,
        )

    def _prepare_inputs(self, data: DataSettings, dataset: Dataset) -> None:
        """Padding and standardization come after the task transforms (a rotation pads with
        black, which standardization then maps like any black pixel)."""
        if not data.normalize and not data.pad_to:
            return
        mean, std = float(dataset.train.x.mean()), float(dataset.train.x.std())

        def prepare(split: LabelledSplit) -> LabelledSplit:
            x = pad_to(split.x, data.pad_to) if data.pad_to else split.x
            return LabelledSplit(standardize(x, mean, std) if data.normalize else x, split.y)

        self._client_tasks = [[prepare(s) for s in tasks] for tasks in self._client_tasks]
        self._test = [prepare(s) for s in self._test]
        self.input_shape = tuple(self._test[0].x.shape[1:])

    def task_of(self, partition_id: int, server_round: int) -> int:
        """The task a client trains on in a (1-based) round (always 0 in joint training)."""
        if self.data.training == "joint":
            return 0
        return self.schedule.task_of(partition_id, server_round)

    def train_data(self, partition_id: int, task: int) -> LabelledSplit:
        """The client's data for ``task``; in joint training, all its tasks' data at once."""
        if not 0 <= partition_id < self.data.clients:
            raise FedtideError(
                f"partition-id {partition_id} is outside 0..{self.data.clients - 1}: "
                "start as many clients as --clients says"
            )
        if self.data.training == "joint":
            if partition_id not in self._joint:
                parts = self._client_tasks[partition_id]
                self._joint[partition_id] = LabelledSplit(
                    torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])
                )
            return self._joint[partition_id]
        return self._client_tasks[partition_id][task]

    def test_data(self, task: int) -> LabelledSplit:
        return self._test[task]


def _make_tasks(data: DataSettings, dataset: Dataset, rng: np.random.Generator) -> list[Task]:
    n = data.num_tasks
    if data.scenario == "class-incremental":
        if n > dataset.num_classes:
            raise FedtideError(
                f"--num-tasks {n} is more than the {dataset.num_classes} classes of "
                f"{dataset.name}: a class-incremental task needs at least one class"
            )
        groups = np.array_split(np.arange(dataset.num_classes), n)
        return [Task(i, classes=tuple(int(c) for c in g)) for i, g in enumerate(groups)]
    if data.scenario == "domain-incremental":
        if data.domain_transform == "rotation":
            step = 180.0 / n
            return [Task(i, rotation=i * step) for i in range(n)]
        pixels = int(np.prod(dataset.input_shape[1:]))
        perms = [torch.arange(pixels)] + [
            torch.from_numpy(rng.permutation(pixels)) for _ in range(n - 1)
        ]
        return [Task(i, permutation=p) for i, p in enumerate(perms)]
    if data.scenario == "distributed-drift":  # concept 0 keeps the labels, the others permute them
        return [Task(0, label_map=torch.arange(dataset.num_classes))] + [
            Task(i, label_map=torch.from_numpy(rng.permutation(dataset.num_classes))) for i in range(1, n)
        ]
    # concept drift: task 0 keeps the labels; later tasks move every label elsewhere
    maps = [torch.arange(dataset.num_classes)]
    for _ in range(n - 1):
        shift = int(rng.integers(1, dataset.num_classes))
        maps.append((torch.arange(dataset.num_classes) + shift) % dataset.num_classes)
    return [Task(i, label_map=m) for i, m in enumerate(maps)]


def _split_clients(
    data: DataSettings, dataset: Dataset, tasks: list[Task], rng: np.random.Generator
) -> list[list[LabelledSplit]]:
    labels = dataset.train.y.numpy()
    class_incremental = data.scenario == "class-incremental"
    if class_incremental:
        task_of_class = np.zeros(dataset.num_classes, dtype=np.int64)
        for task in tasks:
            task_of_class[list(task.classes)] = task.index
        groups = task_of_class[labels]
    else:
        groups = np.zeros(len(labels), dtype=np.int64)
    minimum = MIN_SAMPLES_PER_CLIENT_TASK * (1 if class_incremental else data.num_tasks)
    if data.iid:
        parts = iid_partition(len(labels), data.clients, rng)
        present = np.unique(groups)  # once: per client it took 7.6 s for 10,000 clients
        width = int(groups.max()) + 1 if len(groups) else 0
        smallest = min(int(np.bincount(groups[p], minlength=width)[present].min()) for p in parts)
        if smallest < minimum:
            raise FedtideError(
                f"{data.clients} clients leave some client fewer than {minimum} samples "
                "per task: use fewer --clients or fewer --num-tasks"
            )
    else:
        parts = dirichlet_partition(
            labels, data.clients, data.alpha, rng, groups=groups, min_per_group=minimum
        )
    if data.client_samples:
        parts = [np.sort(rng.permutation(part)[: data.client_samples]) for part in parts]
    per_client = []
    for part in parts:
        client = LabelledSplit(dataset.train.x[part], dataset.train.y[part])
        if class_incremental:
            per_client.append([task.apply(client) for task in tasks])
        else:
            # a stream: the client's samples in a random order, cut into consecutive tasks
            order = torch.from_numpy(rng.permutation(len(part)))
            chunks = torch.tensor_split(order, data.num_tasks)
            per_client.append(
                [task.apply(LabelledSplit(client.x[c], client.y[c])) for task, c in zip(tasks, chunks)]
            )
    return per_client


def _second_dataset(data: DataSettings, first: Dataset) -> Dataset:
    second = load_dataset(data.second_dataset, data.data_dir)
    if second.input_shape != first.input_shape or second.num_classes != first.num_classes:
        raise FedtideError(
            f"--second-dataset {data.second_dataset} has inputs {second.input_shape} and "
            f"{second.num_classes} classes, {data.dataset} has {first.input_shape} and "
            f"{first.num_classes}: a dataset switch needs two datasets of the same shape"
        )
    return second


def _split_switch(data: DataSettings, sources: list[Dataset], rng: np.random.Generator) -> list[list[LabelledSplit]]:
    """Even tasks come from the first dataset, odd ones from the second: each dataset is
    split across clients, and each client's share is cut into the tasks that use it."""
    per_client: list[list[LabelledSplit | None]] = [[None] * data.num_tasks for _ in range(data.clients)]
    for index, source in enumerate(sources):
        task_ids = list(range(index, data.num_tasks, 2))
        if not task_ids:
            continue
        labels = source.train.y.numpy()
        minimum = MIN_SAMPLES_PER_CLIENT_TASK * len(task_ids)
        if data.iid:
            parts = iid_partition(len(labels), data.clients, rng)
        else:
            parts = dirichlet_partition(labels, data.clients, data.alpha, rng, min_per_group=minimum)
        for client, part in enumerate(parts):
            order = torch.from_numpy(rng.permutation(part))
            for task, chunk in zip(task_ids, torch.tensor_split(order, len(task_ids))):
                per_client[client][task] = LabelledSplit(source.train.x[chunk], source.train.y[chunk])
    return per_client  # type: ignore[return-value]


_CACHE: dict[tuple, Scenario] = {}


def build_scenario(data: DataSettings, seed: int) -> Scenario:
    """Build (or reuse, within one process) the scenario these data settings describe with
    this seed, so that a server and its in-process clients share one copy."""
    key = (data, seed)
    if key not in _CACHE:
        _CACHE.clear()  # one scenario at a time is enough; keeps memory bounded
        _CACHE[key] = Scenario(data, seed, load_dataset(data.dataset, data.data_dir))
    return _CACHE[key]
