"""Releasing models: the gate's rules, the registry (release, prune, rollback bit-exact, damage
refused), a simulation's releases and an operator's rollback through the CLI, the gate under
attack, and serving the released model to an edge client that predicts with it."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client.app import app
from client.released_model import Offer, ReleasedModelStore
from common.config import RunConfig
from common.errors import FedtideError
from common.models import build_model
from common.scenarios import build_scenario
from common.sections import ReleaseSettings
from common.weights import weights_digest
from fedtide.cli import main
from fedtide.runtimes.inprocess import InProcessGrid, run_inprocess
from server.federation import client_config
from server.model_registry import ModelRegistry
from server.release_delivery import ReleasedModelDelivery
from server.release_gate import judge, served_timeline

RULE = ReleaseSettings(gate_tolerance=1.0, gate_max_forget=10.0)


def test_the_first_candidate_is_released_and_a_regression_on_the_tasks_seen_is_held():
    assert judge(RULE, [0.9, 0.0], task=0, released=None, releases=[]).passed
    released = [0.95, 0.90]
    held = judge(RULE, [0.93, 0.85], task=1, released=released, releases=[released])
    assert not held.passed and any("best release" in r for r in held.reasons)
    assert any("current task 1 falls 5.00 points" in r for r in held.reasons)
    within = judge(RULE, [0.945, 0.90], task=1, released=released, releases=[released])
    assert within.passed and within.seen_acc == pytest.approx(92.25)


def test_an_old_task_may_fall_only_so_far_and_the_best_release_is_the_reference():
    released = [0.99, 0.0]  # released during task 0; task 1 is new
    learned_new = judge(RULE, [0.92, 0.97], task=1, released=released, releases=[released])
    assert learned_new.passed  # 7 points of forgetting buys a whole new task
    forgot = judge(RULE, [0.80, 0.99], task=1, released=released, releases=[released])
    assert not forgot.passed and any("old task 0 falls 19.00 points" in r for r in forgot.reasons)
    best, current = [0.99, 0.95], [0.97, 0.94]  # a rollback serves `current`; `best` stays the bar
    assert not judge(RULE, [0.97, 0.945], task=1, released=current, releases=[best, current]).passed
    assert not judge(RULE, [float("nan"), 0.9], task=1, released=None, releases=[]).passed


def _weights(seed: int) -> dict[str, torch.Tensor]:
    return build_model("mlp", (1, 8, 8), 10, (16,), seed).state_dict()


def _release(registry: ModelRegistry, round_: int, weights: dict) -> dict:
    with registry.open(create=True) as state:
        registry.put_candidate(state, weights, {"round": round_, "task": 0, "accuracies": [0.5]})
        return registry.release_candidate(state, how="gate")


def test_a_rollback_serves_the_earlier_version_bit_exact_and_damage_is_refused(tmp_path):
    registry = ModelRegistry(tmp_path, keep=2)
    models = [_weights(seed) for seed in range(4)]
    for round_, weights in enumerate(models, start=1):
        _release(registry, round_, weights)
    with registry.open() as state:
        assert [v["version"] for v in state.versions] == [1, 2, 3, 4] and state.released == 4
        assert [bool(v["file"]) for v in state.versions] == [False, False, True, True]  # keep=2
        with pytest.raises(FedtideError, match="weights were removed"):
            registry.rollback(state, to=1)
        entry = registry.rollback(state)  # the one before: version 3
    with registry.open() as state:
        assert state.released == 3 and not state.auto
        served = registry.weights(state.current)
    assert entry["version"] == 3 and all(torch.equal(served[k], models[2][k]) for k in models[2])
    assert weights_digest(served) == entry["sha256"]
    again = _release(registry, 5, models[3])  # the same weights again: version 4, not a new one
    assert again["version"] == 4
    path = tmp_path / "models" / "v0004.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with registry.open() as state, pytest.raises(FedtideError, match="does not match its recorded sha256"):
        registry.weights(state.current)
    (tmp_path / "models" / "registry.json").write_text("{not json")
    with pytest.raises(FedtideError, match="damaged"):
        with registry.open():
            pass


def test_a_simulation_releases_each_task_and_an_operator_rolls_back_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    config = RunConfig.of(num_tasks=3, rounds_per_task=3, hidden="32", quiet=True, out=str(out))
    summary = run_inprocess(config, threads=1)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    registry = ModelRegistry(out)
    with registry.open() as state:
        versions = list(state.versions)
    released_tasks = {v["task"] for v in versions}
    assert released_tasks == {0, 1, 2} and summary["releases"] == len(versions)
    assert summary["released_version"] == rounds[-1]["release"]["released"]
    timeline = served_timeline(versions, rounds)
    assert all(r["best_release"] - r["served"] <= RULE.gate_tolerance + 1e-9 for r in timeline)
    decisions = registry.decisions()
    assert [d["round"] for d in decisions] == list(range(1, 10))
    assert all(d["passed"] or d["reasons"] for d in decisions)  # every hold says why

    first = versions[0]
    before = registry.weights(first)
    assert main(["models", "rollback", str(out), "--to", str(first["version"]), "--note", "test"]) == 0
    capsys.readouterr()
    assert main(["models", "list", str(out), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["released"] == first["version"] and listed["auto"] is False
    with registry.open() as state:
        after = registry.weights(state.current)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert registry.decisions()[-1]["operator"] == "rollback"
    assert main(["models", "release", str(out)]) == 0
    with registry.open() as state:
        assert state.auto and state.released == summary["released_version"]  # the newest candidate, released before
    assert main(["models", "rollback", str(tmp_path / "nothing")]) == 2
    assert "has no model registry" in capsys.readouterr().err


def test_each_release_is_exported_for_edge_inference_with_its_accuracy(tmp_path):
    out = tmp_path / "run"
    run_inprocess(RunConfig.of(num_tasks=1, rounds_per_task=2, hidden="16", quiet=True, out=str(out),
                               export_releases="torchscript", release="every-round"), threads=1)
    registry = ModelRegistry(out)
    with registry.open() as state:
        versions = list(state.versions)
    assert [v["export"]["file"] for v in versions] == ["v0001.pt", "v0002.pt"]
    scripted = torch.jit.load(str(out / "models" / "v0002.pt"))
    model = build_model("mlp", (1, 8, 8), 10, (16,), 0)
    model.load_state_dict(registry.weights(versions[1]))
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(scripted(x).argmax(1), model.eval()(x).argmax(1))
    assert versions[1]["export"]["accuracy_after"] == pytest.approx(versions[1]["export"]["accuracy_before"])


def test_the_gate_holds_the_model_a_reversed_attack_wrecked(tmp_path):
    out = tmp_path / "attacked"
    config = RunConfig.of(
        num_tasks=2, rounds_per_task=4, clients=10, hidden="32", quiet=True, out=str(out), method="replay",
        attack="flip-scale", attack_scale=4.0, attackers=4, attack_rounds="6-7",
        norm_cap=0.0, norm_outlier=0.0, weight_cap=0.0,
    )
    run_inprocess(config, threads=1)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with ModelRegistry(out).open() as state:
        timeline = served_timeline(state.versions, rounds)
    before = timeline[4]["raw"]  # round 5, the last before the attack
    wrecked = [r for r in timeline if r["round"] in (6, 7)]
    assert min(r["raw"] for r in wrecked) < before - 20  # the attack is real
    assert not any(r["new"] for r in wrecked)
    assert all(r["best_release"] - r["served"] <= RULE.gate_tolerance + 1e-9 for r in timeline if r["served"] is not None)


def _edge_message(config: RunConfig, server_round: int, extra: dict | None = None) -> RecordDict:
    scenario = build_scenario(config.data, config.seed)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes,
                        config.network.hidden_widths, config.seed)
    record = client_config(config, scenario)
    record["server-round"] = server_round
    return RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(dict(record)), **(extra or {})})


def _send(grid: InProcessGrid, content: RecordDict, server_round: int) -> Message:
    message = grid.create_message(content, "train", dst_node_id=1, group_id=str(server_round))
    reply = list(grid.send_and_receive([message]))[0]
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    return reply


def test_an_edge_client_keeps_the_served_model_reports_it_and_predicts_with_it(tmp_path, capsys):
    config = RunConfig.of(hidden="16", local_epochs=1, quiet=True)
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), rng.integers(0, 10, 40)
    np.savez(inbox / "a.npz", x=x[:20], y=y[:20])
    grid = InProcessGrid(app, [{"inbox": str(inbox), "state-dir": str(state)}])
    first = _send(grid, _edge_message(config, 1), 1)
    assert first.content["metrics"]["released-version"] == 0

    released = _weights(7)
    good = {"released": ArrayRecord(released),
            "release": ConfigRecord({"version": 3, "sha256": weights_digest(released)})}
    np.savez(inbox / "b.npz", x=x[20:], y=y[20:])
    second = _send(grid, _edge_message(config, 2, good), 2)
    assert second.content["metrics"]["released-version"] == 3
    assert "released-acc" not in second.content["metrics"]  # no model was held while b.npz arrived
    store = ReleasedModelStore(state)
    assert weights_digest(store.load().model.state_dict()) == weights_digest(released)

    lying = {"released": ArrayRecord(_weights(8)), "release": ConfigRecord({"version": 4, "sha256": weights_digest(released)})}
    third = _send(grid, _edge_message(config, 3, lying), 3)
    assert third.content["metrics"]["released-version"] == 3  # not what it claims: the held model stays

    np.savez(tmp_path / "ask.npz", x=x[:5])
    assert main(["predict", "--state", str(state), str(tmp_path / "ask.npz")]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert lines[0] == "index,prediction" and len(lines) == 6 and "version 3" in printed.err
    expected = store.load().model(torch.from_numpy(x[:5].astype(np.float32) / 255).reshape(5, 1, 8, 8)).argmax(1)
    assert [int(line.split(",")[1]) for line in lines[1:]] == expected.tolist()
    np.savez(tmp_path / "labelled.npz", x=x, y=y)
    assert main(["predict", "--state", str(state), str(tmp_path / "labelled.npz"), "--out", str(tmp_path / "p.npz")]) == 0
    assert "accuracy" in capsys.readouterr().err and np.load(tmp_path / "p.npz")["prediction"].shape == (40,)
    np.savez(tmp_path / "wrong.npz", x=rng.integers(0, 256, (3, 5, 5), dtype=np.uint8))
    assert main(["predict", "--state", str(state), str(tmp_path / "wrong.npz")]) == 2
    assert "x has shape [3, 5, 5]" in capsys.readouterr().err


@pytest.mark.parametrize("version, sha, weights, reason", [
    (-1, None, None, "version"), (True, None, None, "version"), ("3", None, None, "version"), (10**13, None, None, "version"),
    (2, "abc", None, "sha256"), (2, None, {"w": torch.ones(3)}, "does not fit"),
])
def test_a_bad_offer_is_refused_and_the_held_model_stays(tmp_path, version, sha, weights, reason, caplog):
    config = RunConfig.of(hidden="16", quiet=True)
    store = ReleasedModelStore(tmp_path)
    good = _weights(0)
    assert store.keep(Offer(1, weights_digest(good), good), config.client, (1, 8, 8), 10)
    weights = weights if weights is not None else _weights(1)
    offer = Offer(version, sha if sha is not None else weights_digest(weights), weights)
    assert not store.keep(offer, config.client, (1, 8, 8), 10)
    assert reason in caplog.text and store.held_version() == 1
    (tmp_path / "released.safetensors").write_bytes(b"\x00" * 10)  # damaged on disk: refused, not used
    with pytest.raises(FedtideError, match="cannot be read"):
        store.load()


def test_the_server_serves_the_released_version_to_nodes_that_hold_another(tmp_path):
    registry = ModelRegistry(tmp_path)
    _release(registry, 1, _weights(0))
    _release(registry, 2, _weights(1))
    delivery = ReleasedModelDelivery(registry)

    def messages():
        content = RecordDict({"arrays": ArrayRecord(_weights(2)), "config": ConfigRecord({})})
        return [Message(content=content, message_type="train", dst_node_id=n) for n in (1, 2, 3)]

    assert all("released" not in m.content for m in delivery.configure(1, messages()))  # nobody said what it holds
    delivery.held = {1: 0, 2: 2}
    sent = {m.metadata.dst_node_id: m for m in delivery.configure(2, messages())}
    assert "released" in sent[1].content and sent[1].content["release"]["version"] == 2
    assert "released" not in sent[2].content and "released" not in sent[3].content
    with registry.open() as state:
        registry.rollback(state)  # an operator, while the run goes on
    sent = {m.metadata.dst_node_id: m for m in delivery.configure(3, messages())}
    assert sent[2].content["release"]["version"] == 1
    assert weights_digest(sent[2].content["released"].to_torch_state_dict()) == weights_digest(_weights(0))


def test_the_prediction_endpoint_answers_and_refuses_bad_requests(tmp_path):
    import io
    import threading

    from client.released_model import ReleasedModel
    from fedtide.predict_server import make_server

    model = build_model("mlp", (1, 8, 8), 10, (16,), 0).eval()
    released = ReleasedModel(5, weights_digest(model.state_dict()), model, (1, 8, 8), 10)
    server = make_server("127.0.0.1:0", released, (0.0, 1.0))
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert json.load(urllib.request.urlopen(f"{base}/model"))["version"] == 5
        buffer = io.BytesIO()
        np.savez(buffer, x=np.zeros((3, 64), np.float32))
        request = urllib.request.Request(f"{base}/predict", data=buffer.getvalue(), headers={"X-Filename": "a.npz"})
        answer = json.load(urllib.request.urlopen(request))
        assert answer["version"] == 5 and len(answer["predictions"]) == 3 and answer["accuracy"] is None
        bad = urllib.request.Request(f"{base}/predict", data=b"not a file", headers={"X-Filename": "a.npz"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad)
        assert err.value.code == 400 and "not an .npz archive" in json.load(err.value)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_fuzzed_replies_never_crash_the_release_delivery(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from reply_fuzz import fuzz_replies, run_fuzz
    from common.schedule import TaskSchedule
    from server.history import RunHistory
    from server.reply_metrics import LARGE
    from server.strategy import run_strategy

    registry = ModelRegistry(tmp_path)
    rng = np.random.default_rng(2)
    global_arrays = {"w": rng.normal(size=(6, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    _release(registry, 1, {k: torch.from_numpy(v) for k, v in global_arrays.items()})
    delivery = ReleasedModelDelivery(registry)
    history = RunHistory(TaskSchedule.build(num_tasks=1, rounds_per_task=10, clients=10, spread=0, seed=0))
    strategy = run_strategy(RunConfig.of(clients=10), history, extra_hooks=[delivery])
    replies = fuzz_replies(global_arrays, 200, seed=11)
    result = run_fuzz(strategy, global_arrays, [c for _, c in replies], per_round=10)
    assert (result.crashes, result.non_finite) == (0, 0), result.errors
    assert all(isinstance(v, int) and 0 <= v <= LARGE for v in delivery.held.values())
