"""SI and MAS: importance-weighted pulls towards the last boundary's weights, no sample kept."""

import torch

from client.learner import LocalTraining, train_local
from client.methods.mas import MemoryAwareSynapses
from client.methods.si import SynapticIntelligence
from common.config import RunConfig
from common.datasets import LabelledSplit
from common.models import build_model


def _model():
    return build_model("mlp", (1, 8, 8), 10, (16,), seed=0)


def _task(labels: list[int], n: int = 64, seed: int = 0) -> LabelledSplit:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)[torch.randint(0, len(labels), (n,), generator=g)]
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.2 + y.view(-1, 1, 1, 1) / 10  # a class-dependent brightness
    return LabelledSplit(x, y)


def _train(model, data, methods, epochs=2):
    for method in methods:
        method.start_data(model, data, drifted=False)
    return train_local(model, data, methods, LocalTraining(lr=0.1, epochs=epochs, batch_size=16),
                       torch.Generator().manual_seed(0), torch.device("cpu"))


def test_si_learns_importance_from_its_own_steps_and_pulls_back_after_a_new_task_begins():
    model, si = _model(), SynapticIntelligence(strength=1.0)
    _train(model, _task([0, 1]), [si])
    assert si.path and not si.omega  # integrating; nothing consolidated before the task ends
    second = _task([2, 3], seed=1)
    si.start_data(model, second, drifted=False)  # labels it never had: the first task ended
    assert si.omega and all(bool((o >= 0).all()) for o in si.omega.values())
    assert sum(float(o.sum()) for o in si.omega.values()) > 0
    assert float(si.penalty(model, second.x, model(second.x)).detach()) == 0.0  # at the anchor
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    assert float(si.penalty(model, second.x, model(second.x)).detach()) > 0.0


def test_mas_measures_each_round_and_consolidates_at_a_drift():
    model, mas = _model(), MemoryAwareSynapses(strength=1.0)
    data = _task([0, 1])
    _train(model, data, [mas], epochs=1)
    _train(model, data, [mas], epochs=1)
    assert mas.rounds == 2 and not mas.omega
    mas.start_data(model, data, drifted=True)  # same labels, but the client's detector saw a drift
    assert mas.omega and mas.rounds == 1  # consolidated, then measured the new task's first round
    assert all(torch.equal(mas.anchor[n], p.detach()) for n, p in model.named_parameters())


def test_importance_state_survives_a_restart_and_a_tampered_one_does_not_crash():
    model, si = _model(), SynapticIntelligence(strength=1.0)
    _train(model, _task([0, 1]), [si])
    si.start_data(model, _task([2, 3]), drifted=False)
    restored = SynapticIntelligence(strength=1.0)
    restored.load_state(si.state(), torch.device("cpu"))
    x = _task([2]).x
    assert torch.allclose(restored.penalty(model, x, model(x)), si.penalty(model, x, model(x)))
    bad = {k: (torch.full((3,), float("nan")) if k.startswith("omega.") else v) for k, v in si.state().items()}
    tampered = SynapticIntelligence(strength=1.0)
    tampered.load_state(bad, torch.device("cpu"))
    assert float(tampered.penalty(model, x, model(x)).detach()) == 0.0  # shapes not this model's: no pull, no crash


def test_si_and_mas_are_methods_a_run_can_name():
    assert RunConfig.of(method="si", si_c=2.0).methods.options["si-c"] == 2.0
    assert RunConfig.of(method="replay+mas").methods.parts == ("replay", "mas")


def test_a_tampered_mas_round_count_is_ignored():
    model, mas = _model(), MemoryAwareSynapses(strength=1.0)
    _train(model, _task([0, 1]), [mas], epochs=1)
    for bad in (torch.tensor([1, 2]), torch.tensor(0.5), torch.tensor(-7)):
        restored = MemoryAwareSynapses(strength=1.0)
        restored.load_state({**mas.state(), "rounds": bad}, torch.device("cpu"))
        assert restored.rounds in (0, 1)  # a count it can use, never a crash or a negative
