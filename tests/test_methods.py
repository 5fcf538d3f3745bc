import torch

from client.methods import EWC, LwF, Proximal, build_methods
from common.config import RunConfig
from common.datasets import LabelledSplit
from common.models import build_model


def _model_and_data():
    model = build_model("mlp", (1, 8, 8), 10, (16,), seed=0)
    g = torch.Generator().manual_seed(0)
    data = LabelledSplit(torch.rand(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g))
    return model, data


def _nudge(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)


def test_ewc_penalty_is_zero_at_anchor_and_positive_away():
    model, data = _model_and_data()
    ewc = EWC(strength=10.0)
    ewc.start_task(model, data)
    logits = model(data.x)
    assert float(ewc.penalty(model, data.x, logits).detach()) == 0.0
    _nudge(model)
    assert float(ewc.penalty(model, data.x, model(data.x)).detach()) > 0.0


def test_ewc_fisher_is_nonnegative_and_accumulates_over_tasks():
    model, data = _model_and_data()
    ewc = EWC(strength=1.0)
    ewc.start_task(model, data)
    first = {n: f.clone() for n, f in ewc.fisher.items()}
    assert all(bool((f >= 0).all()) for f in first.values())
    ewc.start_task(model, data)
    assert all(torch.allclose(ewc.fisher[n], 2 * first[n]) for n in first)


def test_proximal_term_is_zero_at_global_model_and_grows_with_distance():
    model, data = _model_and_data()
    prox = Proximal(mu=0.1)
    prox.start_round(model)
    assert float(prox.penalty(model, data.x, model(data.x)).detach()) == 0.0
    _nudge(model)
    assert float(prox.penalty(model, data.x, model(data.x)).detach()) > 0.0


def test_lwf_penalty_is_zero_when_student_equals_teacher():
    model, data = _model_and_data()
    lwf = LwF(weight=1.0, temperature=2.0)
    lwf.start_task(model, data)
    assert abs(float(lwf.penalty(model, data.x, model(data.x)).detach())) < 1e-6
    _nudge(model)
    assert float(lwf.penalty(model, data.x, model(data.x)).detach()) > 1e-6


def test_methods_compose_from_one_flag():
    config = RunConfig(method="replay+ewc+lwf", prox_mu=0.01)
    names = [m.name for m in build_methods(config, seed=0)]
    assert names == ["replay", "ewc", "lwf", "prox"]
    assert build_methods(RunConfig(method="naive"), seed=0) == []


def test_more_epochs_of_the_same_round_keep_fedprox_anchored_to_the_global_model():
    from client.learner import train_local

    model, data = _model_and_data()
    prox = Proximal(mu=0.1)
    global_weights = [p.detach().clone() for p in model.parameters()]
    config = RunConfig(local_epochs=1, batch_size=8, lr=0.1)
    train_local(model, data, [prox], config, torch.Generator().manual_seed(0), torch.device("cpu"))
    train_local(model, data, [prox], config, torch.Generator().manual_seed(1), torch.device("cpu"),
                observe=False, continuing=True)  # a drift reaction's extra epochs
    assert all(torch.equal(a, b) for a, b in zip(prox.global_params, global_weights))
    assert not all(torch.equal(a, b.detach()) for a, b in zip(global_weights, model.parameters()))
