import pytest
import torch

from client.methods import Replay
from client.replay import ReplayBuffer
from common.config import RunConfig
from common.errors import FedtideError
from common.transforms import random_shifts


def _stream(n):
    return torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n)


def test_buffer_never_exceeds_capacity_and_counts_everything_seen():
    buffer = ReplayBuffer(capacity=50, seed=0)
    x, y = _stream(1000)
    for start in range(0, 1000, 64):
        buffer.add(x[start : start + 64], y[start : start + 64])
    assert len(buffer) == 50
    assert buffer.seen == 1000
    assert buffer.x.shape[0] == 50


def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    # each of 10 equal stream segments should hold ~10% of the memory, over many draws
    counts = torch.zeros(10)
    x, y = _stream(1000)
    for seed in range(200):
        buffer = ReplayBuffer(capacity=100, seed=seed)
        buffer.add(x, y)
        counts += torch.bincount(buffer.y[: len(buffer)] // 100, minlength=10)
    shares = counts / counts.sum()
    assert torch.all((shares - 0.1).abs() < 0.015), shares


def test_state_round_trip_restores_memory_and_sampling():
    buffer = ReplayBuffer(capacity=20, seed=1)
    x, y = _stream(100)
    buffer.add(x, y)
    restored = ReplayBuffer(capacity=20, seed=99)
    restored.load_state(buffer.state())
    assert torch.equal(restored.y[: len(restored)], buffer.y[: len(buffer)])
    assert restored.seen == 100
    assert torch.equal(restored.sample_slots(8), buffer.sample_slots(8))


def test_random_shifts_move_each_image_by_at_most_the_given_offset():
    images = torch.zeros(200, 1, 9, 9)
    images[:, 0, 4, 4] = 1.0  # one bright pixel in the centre of a dark image
    moved = random_shifts(images, 2, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape
    assert torch.equal(moved.sum(dim=(1, 2, 3)), torch.ones(200))  # the pixel moved, nothing else came in
    where = moved[:, 0].flatten(1).argmax(dim=1)
    rows, cols = where // 9, where % 9
    assert set((rows - 4).tolist()) == {-2, -1, 0, 1, 2} and set((cols - 4).tolist()) == {-2, -1, 0, 1, 2}
    assert torch.equal(random_shifts(images, 0, torch.Generator()), images)


def test_replay_shift_moves_the_replayed_memories_and_leaves_new_samples_alone():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 1, 8, 8, generator=g), torch.randint(0, 10, (30,), generator=g)
    replay = Replay(capacity=30, seed=0, shift=1, fill="stream")
    replay.observe(x, y)
    new_x, new_y = x[:10] + 5.0, y[:10]
    batch_x, batch_y = replay.extend_batch(new_x, new_y)
    assert torch.equal(batch_x[:10], new_x)
    drawn = replay._drawn
    assert torch.equal(batch_y[10:], y[drawn])
    assert not torch.equal(batch_x[10:], x[drawn])  # shifted copies, not the stored images
    assert torch.equal(replay.buffer.x, x)  # the memory itself is unchanged


def test_replay_shift_is_refused_where_it_means_nothing():
    assert RunConfig.of(method="naive", replay_shift=2) == RunConfig.of(method="naive")  # unread: changes nothing
    from fedtide.cli import build_parser
    from fedtide.run_flags import config_from_args

    with pytest.raises(FedtideError, match="--replay-shift is set but --method naive does not use it"):
        config_from_args(build_parser().parse_args(["simulate", "--method", "naive", "--replay-shift", "2"]))
    with pytest.raises(FedtideError, match="permuted"):
        RunConfig.of(method="der", replay_shift=2, scenario="domain-incremental", domain_transform="permutation")
    on_vectors = Replay(capacity=4, seed=0, shift=1, fill="stream")  # e.g. an edge client fed flat feature rows
    on_vectors.observe(torch.rand(4, 64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(FedtideError, match="replay-shift"):
        on_vectors.extend_batch(torch.rand(2, 64), torch.zeros(2, dtype=torch.long))


def test_a_memory_restored_into_a_larger_capacity_holds_no_blank_samples():
    small = ReplayBuffer(capacity=5, seed=0)
    small.add(*_stream(100))
    larger = ReplayBuffer(capacity=10, seed=0)  # e.g. --memory-size raised between runs
    larger.load_state(small.state())
    assert len(larger) == 5
    assert set(larger.sample_slots(200).tolist()) <= set(range(5))
    larger.add(torch.tensor([[1000.0]]), torch.tensor([7]))  # the next sample fills an empty slot
    assert len(larger) == 6 and float(larger.x[5, 0]) == 1000.0


def test_replay_shift_changes_how_memories_look_not_which_are_kept_or_replayed():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 1, 8, 8, generator=g), torch.randint(0, 10, (60,), generator=g)
    plain, shifted = Replay(capacity=20, seed=3, fill="stream"), Replay(capacity=20, seed=3, shift=2, fill="stream")
    for start in range(0, 60, 10):
        for replay in (plain, shifted):
            if len(replay.buffer):
                replay.extend_batch(x[start : start + 10], y[start : start + 10])
            replay.observe(x[start : start + 10], y[start : start + 10])
        assert torch.equal(plain.buffer.x, shifted.buffer.x)
        if plain._drawn is not None:
            assert torch.equal(plain._drawn, shifted._drawn)
