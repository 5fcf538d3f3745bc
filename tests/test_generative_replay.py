"""dgr: replay from a per-client generator, with no sample kept in the client's state."""

import torch

from client.learner import LocalTraining, train_local
from client.methods.dgr import DeepGenerativeReplay
from common.config import RunConfig
from common.datasets import LabelledSplit
from common.errors import FedtideError
from common.models import build_model

import pytest


def _task(labels, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)[torch.randint(0, len(labels), (n,), generator=g)]
    x = (torch.rand(n, 1, 8, 8, generator=g) * 0.3 + y.view(-1, 1, 1, 1) / 15).clamp(0, 1)
    return LabelledSplit(x, y)


def _round(model, dgr, data):
    dgr.start_data(model, data, drifted=False)
    return train_local(model, data, [dgr], LocalTraining(lr=0.1, epochs=1, batch_size=16),
                       torch.Generator().manual_seed(0), torch.device("cpu"))


def test_after_a_task_ends_every_batch_is_joined_by_generated_samples_of_the_old_classes_only():
    model = build_model("mlp", (1, 8, 8), 10, (16,), seed=0)
    dgr = DeepGenerativeReplay(seed=0, hidden=32, latent=4)
    first = _task([0, 1])
    _round(model, dgr, first)
    x, y = dgr.extend_batch(first.x[:8], first.y[:8])
    assert x.shape[0] == 8  # the first task: nothing to replay yet
    second = _task([2, 3], seed=1)
    dgr.start_data(model, second, drifted=False)  # new labels: the first task ended
    x, y = dgr.extend_batch(second.x[:8], second.y[:8])
    assert x.shape == (16, 1, 8, 8) and set(y[8:].tolist()) <= {0, 1}
    assert bool(((x[8:] >= 0) & (x[8:] <= 1)).all())  # pixels, as the inputs were
    penalty = dgr.penalty(model, x, model(x))
    assert penalty is not None and float(penalty.detach()) > -1e-6  # distilled from the model that ended the task


def test_the_generator_learns_the_clients_data():
    model = build_model("mlp", (1, 8, 8), 10, (16,), seed=0)
    dgr = DeepGenerativeReplay(seed=0, hidden=32, latent=4, lr=1e-2)
    data = _task([0, 5], n=256)
    dgr.start_data(model, data, drifted=False)
    before = float(dgr.generator.loss(data.x.flatten(1), data.y, True).detach())
    for _ in range(5):
        _round(model, dgr, data)
    assert float(dgr.generator.loss(data.x.flatten(1), data.y, True).detach()) < 0.9 * before


def test_the_state_holds_weights_only_and_a_restarted_client_replays_the_same_way():
    model = build_model("mlp", (1, 8, 8), 10, (16,), seed=0)
    dgr = DeepGenerativeReplay(seed=0, hidden=32, latent=4)
    first, second = _task([0, 1], n=50), _task([2, 3], n=50, seed=1)
    _round(model, dgr, first)
    _round(model, dgr, second)
    state = dgr.state()
    sample_sized = [k for k, v in state.items() if v.dim() >= 2 and (v.shape[0] == 50 or v.shape[1:] == (1, 8, 8))]
    assert not sample_sized  # no tensor of samples: generator and teacher weights, labels seen
    restored = DeepGenerativeReplay(seed=0, hidden=32, latent=4)
    restored.load_state(state, torch.device("cpu"))
    restored.start_data(model, second, drifted=False)  # same labels: the second task goes on
    dgr.start_data(model, second, drifted=False)
    assert torch.equal(restored.old_labels, dgr.old_labels)
    assert all(torch.equal(a, b) for a, b in zip(restored.replayer.state_dict().values(),
                                                   dgr.replayer.state_dict().values()))
    x1, y1 = restored.extend_batch(second.x[:4], second.y[:4])
    x2, y2 = dgr.extend_batch(second.x[:4], second.y[:4])
    assert torch.equal(y1, y2) and torch.allclose(x1, x2)


def test_a_state_of_other_settings_or_tampered_starts_the_generator_fresh():
    model = build_model("mlp", (1, 8, 8), 10, (16,), seed=0)
    dgr = DeepGenerativeReplay(seed=0, hidden=32, latent=4)
    _round(model, dgr, _task([0, 1]))
    _round(model, dgr, _task([2, 3], seed=1))
    wider = DeepGenerativeReplay(seed=0, hidden=64, latent=4)  # --dgr-hidden changed between runs
    wider.load_state(dgr.state(), torch.device("cpu"))
    wider.start_data(model, _task([2, 3], seed=1), drifted=False)
    assert wider.replayer is None and wider.generator is not None
    odd = DeepGenerativeReplay(seed=0, hidden=32, latent=4)
    odd.load_state({**dgr.state(), "bounded": torch.tensor([1, 2])}, torch.device("cpu"))
    odd.start_data(model, _task([2, 3], seed=1), drifted=False)
    assert odd.bounded  # not a flag: the default, pixels in [0, 1]
    bad = {**dgr.state(), "old-labels": torch.tensor([0, 99])}  # a class the model does not have
    tampered = DeepGenerativeReplay(seed=0, hidden=32, latent=4)
    tampered.load_state(bad, torch.device("cpu"))
    tampered.start_data(model, _task([2, 3], seed=1), drifted=False)
    assert tampered.replayer is None


def test_dgr_is_a_method_a_run_can_name_and_not_beside_a_memory():
    assert RunConfig.of(method="dgr+lwf", dgr_hidden=200).methods.options["dgr-hidden"] == 200
    with pytest.raises(FedtideError, match="dgr"):
        RunConfig.of(method="dgr+replay")
