"""fedtide's own SGD gives torch.optim.SGD's numbers bit for bit, and a training round with it
never imports torch's compiler stack."""

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import client.learner
from client.learner import LocalTraining, make_optimizer
from client.plain_sgd import PlainSGD
from client.rounds import train_round
from common.config import RunConfig
from common.models import build_model
from common.scenarios import build_scenario
from common.weights import freeze

ROOT = Path(__file__).resolve().parents[1]


def _train(model, optimizer, batches, set_to_none=True):
    for x, y in batches:
        optimizer.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _batches(steps=6, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(steps)]


def _assert_same_parameters(a, b):
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("frozen", [(), ("features.3",)])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_plain_sgd_updates_parameters_exactly_as_torch_sgd(model_name, frozen, set_to_none):
    model = build_model(model_name, (1, 8, 8), 10, (16, 16), seed=0)
    freeze(model, frozen)
    ours, theirs = model, copy.deepcopy(model)
    start = copy.deepcopy(model)
    # every parameter, frozen ones included: both must skip those without a gradient
    _train(ours, PlainSGD(ours.parameters(), lr=0.05), _batches(), set_to_none)
    _train(theirs, torch.optim.SGD(theirs.parameters(), lr=0.05), _batches(), set_to_none)
    _assert_same_parameters(ours, theirs)
    moved = [not torch.equal(p, q) for p, q in zip(ours.parameters(), start.parameters())]
    assert any(moved)
    for (name, p), changed in zip(ours.named_parameters(), moved):
        assert changed == p.requires_grad, name


def test_a_parameter_without_gradient_is_left_alone():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = PlainSGD([used, unused], lr=0.5)
    (used * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    optimizer.step()
    assert torch.equal(used.detach(), torch.tensor([0.5, 0.0, -0.5]))
    assert torch.equal(unused.detach(), torch.ones(3))


def test_the_learner_builds_plain_sgd_and_keeps_adam_on_torch():
    model = build_model("mlp", (1, 8, 8), 10, (16,), seed=0)
    freeze(model, ("features.1",))
    sgd = make_optimizer(LocalTraining(lr=0.1, epochs=1, batch_size=8), model)
    assert isinstance(sgd, PlainSGD)
    assert [id(p) for p in sgd.params] == [id(p) for p in model.parameters() if p.requires_grad]
    assert isinstance(make_optimizer(LocalTraining(0.1, 1, 8, "adam"), model), torch.optim.Adam)


@pytest.mark.parametrize("method", ["naive", "replay+ewc", "der+lwf"])
def test_a_training_round_gives_torch_sgds_weights(method, monkeypatch):
    config = RunConfig.of(num_tasks=2, clients=2, iid=True, client_samples=60, method=method, local_epochs=2,
                          batch_size=16, hidden="16")
    scenario = build_scenario(config.data, config.seed)
    weights = build_model("mlp", scenario.input_shape, scenario.num_classes, config.network.hidden_widths, 0).state_dict()

    def two_rounds():
        first = train_round(config, 0, 1, weights, {})
        later_round = config.data.rounds_per_task + 1  # the next task: the methods' memories take part
        return train_round(config, 0, later_round, first.weights, first.state)

    ours = two_rounds()
    monkeypatch.setattr(client.learner, "PlainSGD", torch.optim.SGD)
    theirs = two_rounds()
    assert ours.weights.keys() == theirs.weights.keys()
    for name in ours.weights:
        assert torch.equal(ours.weights[name], theirs.weights[name]), name
    assert ours.metrics == theirs.metrics


def test_a_training_round_does_not_import_torchs_compiler():
    script = textwrap.dedent("""
        import sys
        from client.rounds import train_round
        from common.config import RunConfig
        from common.models import build_model
        from common.scenarios import build_scenario
        config = RunConfig.of(num_tasks=1, clients=2, iid=True, client_samples=40, local_epochs=1, hidden="8")
        scenario = build_scenario(config.data, config.seed)
        weights = build_model("mlp", scenario.input_shape, scenario.num_classes, (8,), 0).state_dict()
        train_round(config, 0, 1, weights, {})
        print("torch._dynamo" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
