import torch

import pytest

from client.methods import EWC, DarkReplay, LwF, Proximal, build_methods
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


def _dark_replay_after_one_task(model, data):
    der = DarkReplay(capacity=20, seed=0, weight=1.0, policy="reservoir", fill="stream")
    der.observe(data.x, data.y)
    der.start_task(model, data)  # the task ends: its memories take the model's logits
    return der


def test_der_keeps_each_memorys_logits_from_the_end_of_its_task():
    model, data = _model_and_data()
    der = _dark_replay_after_one_task(model, data)
    with torch.no_grad():
        expected = model(der.buffer.x[:20])
    assert torch.allclose(der.logits[:20], expected)
    first_task_logits = der.logits[:20].clone()
    _nudge(model)
    der.observe(data.x + 1.0, data.y)  # the next task's samples replace some memories
    replaced = ~der.known[:20]
    assert 0 < int(replaced.sum()) < 20
    der.start_task(model, data)
    with torch.no_grad():
        assert torch.allclose(der.logits[:20][replaced], model(der.buffer.x[:20][replaced]))
    # memories of the first task keep the first model's logits
    assert torch.equal(der.logits[:20][~replaced], first_task_logits[~replaced])


def test_der_penalty_is_zero_at_the_stored_logits_and_positive_away():
    model, data = _model_and_data()
    der = _dark_replay_after_one_task(model, data)
    x, y = der.extend_batch(data.x[:8], data.y[:8])
    assert x.shape[0] == 16
    assert float(der.penalty(model, x, model(x)).detach()) < 1e-10
    _nudge(model)
    assert float(der.penalty(model, x, model(x)).detach()) > 1e-4


def test_der_memories_without_logits_count_only_by_their_label():
    model, data = _model_and_data()
    der = DarkReplay(capacity=20, seed=0, weight=1.0, fill="stream")
    der.observe(data.x, data.y)  # the first task is still running: no logits yet
    x, _ = der.extend_batch(data.x[:8], data.y[:8])
    assert der.penalty(model, x, model(x)) is None


def test_der_state_round_trips_memories_and_logits():
    model, data = _model_and_data()
    der = _dark_replay_after_one_task(model, data)
    der.observe(data.x + 1.0, data.y)
    restored = DarkReplay(capacity=20, seed=0, weight=1.0, policy="reservoir", fill="stream")
    restored.load_state(der.state(), torch.device("cpu"))
    assert torch.equal(restored.buffer.x, der.buffer.x)
    assert torch.equal(restored.known, der.known)
    assert torch.equal(restored.logits, der.logits)
    assert torch.equal(restored.buffer.sample_slots(5), der.buffer.sample_slots(5))


def test_der_cannot_be_combined_with_replay():
    from common.errors import FedtideError

    with pytest.raises(FedtideError, match="der alone"):
        RunConfig.of(method="replay+der")
    config = RunConfig.of(method="der+lwf", memory_size=50)
    assert [m.name for m in build_methods(config.methods.parts, config.methods.options, 0, config.learner.lr)] == ["der", "lwf"]


def test_methods_compose_from_one_flag():
    config = RunConfig.of(method="replay+ewc+lwf", prox_mu=0.01)
    names = [m.name for m in build_methods(config.methods.parts, config.methods.options, 0, config.learner.lr)]
    assert names == ["replay", "ewc", "lwf", "prox"]
    assert build_methods((), RunConfig().methods.options, 0, 0.1) == []


def test_more_epochs_of_the_same_round_keep_fedprox_anchored_to_the_global_model():
    from client.learner import LocalTraining, train_local

    model, data = _model_and_data()
    prox = Proximal(mu=0.1)
    global_weights = [p.detach().clone() for p in model.parameters()]
    training = LocalTraining(lr=0.1, epochs=1, batch_size=8)
    train_local(model, data, [prox], training, torch.Generator().manual_seed(0), torch.device("cpu"))
    train_local(model, data, [prox], training, torch.Generator().manual_seed(1), torch.device("cpu"),
                observe=False, continuing=True)  # a drift reaction's extra epochs
    assert all(torch.equal(a, b) for a, b in zip(prox.global_params, global_weights))
    assert not all(torch.equal(a, b.detach()) for a, b in zip(global_weights, model.parameters()))
