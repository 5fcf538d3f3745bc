"""Replay memory policies (which samples a memory keeps) and fills (when they join it)."""

import torch
from torch import nn

from client.methods import DarkReplay, Replay
from client.replay import ClassBalancedBuffer, ReplayBuffer, merge
from common.config import RunConfig
from common.datasets import LabelledSplit


def _labelled(counts: dict[int, int], offset: float = 0.0):
    """Samples whose single feature numbers them within their class, ``counts[label]`` each."""
    ys = torch.cat([torch.full((n,), label) for label, n in counts.items()])
    xs = torch.cat([torch.arange(n, dtype=torch.float32) for n in counts.values()]).unsqueeze(1) + offset
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))
    return xs[order], ys[order]


def _split(y):
    return LabelledSplit(torch.zeros(len(y), 1), y)


def _held(buffer) -> dict[int, int]:
    return {int(c): int(n) for c, n in zip(*torch.unique(buffer.y[: len(buffer)], return_counts=True))}


def test_class_balanced_memory_gives_a_rare_class_its_share_where_a_reservoir_does_not():
    x, y = _labelled({0: 900, 1: 100})
    balanced, reservoir = ClassBalancedBuffer(100, seed=0), ReplayBuffer(100, seed=0)
    balanced.add(x, y)
    reservoir.add(x, y)
    assert _held(balanced) == {0: 50, 1: 50}
    assert _held(reservoir)[1] < 20  # about 10: the stream's share
    assert balanced.seen == 1000 and balanced.class_seen == {0: 900, 1: 100}


def test_a_new_class_takes_its_share_from_the_largest_classes():
    memory = ClassBalancedBuffer(100, seed=0)
    memory.add(*_labelled({0: 300, 1: 300, 2: 300, 3: 300}))
    memory.add(*_labelled({4: 500}))
    assert _held(memory) == {0: 20, 1: 20, 2: 20, 3: 20, 4: 20}


def test_within_a_class_the_balanced_memory_is_a_uniform_sample_of_that_class():
    counts = torch.zeros(10)
    x = torch.arange(1000, dtype=torch.float32).unsqueeze(1)
    for seed in range(200):
        memory = ClassBalancedBuffer(50, seed=seed)
        memory.add(x, torch.zeros(1000, dtype=torch.long))
        counts += torch.bincount(memory.x[:, 0].long() // 100, minlength=10)
    shares = counts / counts.sum()
    assert torch.all((shares - 0.1).abs() < 0.02), shares


def test_a_reservoir_merge_keeps_each_side_in_proportion_to_what_it_saw():
    memory, staged = ReplayBuffer(100, seed=0), ReplayBuffer(100, seed=1)
    memory.add(*_labelled({0: 3000}))
    staged.add(*_labelled({1: 1000}))
    written = merge(memory, staged)
    assert len(written) == 25 and _held(memory) == {0: 75, 1: 25}
    assert memory.seen == 4000 and len(staged) == 0 and staged.seen == 0


def test_boundary_fill_replays_only_finished_tasks_and_moves_a_task_in_when_new_labels_come():
    replay = Replay(capacity=40, seed=0)  # the defaults: class-balanced, filled at a boundary
    model = nn.Linear(1, 4)
    first_x, first_y = _labelled({0: 50, 1: 50})
    replay.start_data(model, _split(first_y), drifted=False)
    replay.observe(first_x, first_y)
    assert len(replay.buffer) == 0 and len(replay.stage) == 40
    batch_x, _ = replay.extend_batch(first_x[:8], first_y[:8])
    assert batch_x.shape[0] == 8  # nothing finished yet: nothing to replay
    second_x, second_y = _labelled({2: 50, 3: 50}, offset=1000)
    replay.start_data(model, _split(second_y), drifted=False)  # labels 2 and 3 are new: the first task ended
    assert _held(replay.buffer) == {0: 20, 1: 20} and len(replay.stage) == 0
    replay.observe(second_x, second_y)
    _, batch_y = replay.extend_batch(second_x[:8], second_y[:8])
    assert set(batch_y[8:].tolist()) <= {0, 1}  # the replayed half is all old classes
    replay.start_data(model, _split(second_y), drifted=False)  # the same task goes on: no boundary
    assert _held(replay.buffer) == {0: 20, 1: 20}


def test_with_the_same_labels_only_a_detected_drift_ends_the_task():
    replay = Replay(capacity=30, seed=0)
    model = nn.Linear(1, 4)
    x, y = _labelled({0: 20, 1: 20})
    replay.start_data(model, _split(y), drifted=False)
    replay.observe(x, y)
    replay.start_data(model, _split(y), drifted=False)
    assert len(replay.buffer) == 0
    replay.start_data(model, _split(y), drifted=True)  # e.g. the inputs rotated: same labels, new domain
    assert len(replay.buffer) == 30 and len(replay.stage) == 0


def test_the_stage_and_the_labels_seen_survive_a_restart():
    model = nn.Linear(1, 4)
    x, y = _labelled({0: 30, 1: 30})
    replay = Replay(capacity=20, seed=0)
    replay.start_data(model, _split(y), drifted=False)
    replay.observe(x, y)
    restored = Replay(capacity=20, seed=0)
    restored.load_state(replay.state(), torch.device("cpu"))
    assert torch.equal(restored.stage.x, replay.stage.x) and torch.equal(restored.boundary.labels_seen, replay.boundary.labels_seen)
    restored.start_data(model, _split(y), drifted=False)  # labels it knows: still the same task after the restart
    assert len(restored.buffer) == 0
    restored.start_data(model, _split(torch.tensor([2, 2])), drifted=False)
    assert _held(restored.buffer) == {0: 10, 1: 10}


def test_a_stage_saved_under_boundary_fill_joins_the_memory_when_the_fill_becomes_stream():
    model = nn.Linear(1, 4)
    x, y = _labelled({0: 30})
    boundary = Replay(capacity=20, seed=0)
    boundary.start_data(model, _split(y), drifted=False)
    boundary.observe(x, y)
    stream = Replay(capacity=20, seed=0, fill="stream")
    stream.load_state(boundary.state(), torch.device("cpu"))
    assert len(stream.buffer) == 20  # no kept-aside sample is lost


def test_tampered_memory_counts_are_ignored_not_trusted():
    memory = ClassBalancedBuffer(20, seed=0)
    memory.add(*_labelled({0: 30, 1: 30}))
    for bad in (torch.tensor([-5, 10]), torch.tensor([0.5, 2.0]), torch.zeros(2_000_000, dtype=torch.int64)):
        restored = ClassBalancedBuffer(20, seed=0)
        restored.load_state({**memory.state(), "class-seen": bad})
        assert restored.class_seen == {0: 10, 1: 10}  # what the memory itself holds
        restored.add(*_labelled({2: 5}))
        assert len(restored) == 20
    inflated = ClassBalancedBuffer(20, seed=0)
    inflated.load_state({**memory.state(), "class-seen": torch.tensor([10**15, 30])})
    assert inflated.class_seen == {0: 60, 1: 30}  # never more than the memory saw in all
    replay = Replay(capacity=20, seed=0)
    replay.load_state({**Replay(capacity=20, seed=0).state(), "labels-seen": torch.ones(3)}, torch.device("cpu"))
    assert not replay.boundary.labels_seen.any()  # not a bool vector: ignored


def test_der_labels_a_finished_task_with_the_model_that_ends_it():
    model = nn.Linear(1, 4)
    der = DarkReplay(capacity=20, seed=0, weight=1.0)
    x, y = _labelled({0: 15, 1: 15})
    der.start_data(model, _split(y), drifted=False)
    der.observe(x, y)
    assert der.logits is None  # a staged sample has no logits yet
    der.start_data(model, _split(torch.tensor([2, 3])), drifted=False)
    held = len(der.buffer)
    assert held == 20 and bool(der.known[:held].all())
    with torch.no_grad():
        assert torch.allclose(der.logits[:held], model(der.buffer.x[:held]))


def test_the_memory_settings_reach_the_method_and_are_checked():
    config = RunConfig.of(method="replay", memory_policy="reservoir", memory_fill="stream")
    assert config.methods.options["memory-policy"] == "reservoir"
    import pytest

    from common.errors import FedtideError

    with pytest.raises(FedtideError, match="memory-fill"):
        RunConfig.of(method="replay", memory_fill="later")
