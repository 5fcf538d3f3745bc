import torch

from client.replay import ReplayBuffer


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
    assert torch.equal(restored.sample(8)[1], buffer.sample(8)[1])
