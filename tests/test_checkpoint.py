"""Checkpoints and --resume: a crashed run goes on where its last completed round ended,
with the numbers of an uninterrupted run, and bad resume inputs get one-line errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file

from client.app import app as client_app
from client.app import train_many
from common.config import RunConfig
from common.errors import FedtideError
from common.models import build_model
from common.scenarios import build_scenario
from fedtide.cli import main
from fedtide.runtimes.inprocess import InProcessGrid, WorkerPoolGrid, node_configs, run_inprocess
from server.checkpoint import Checkpoint, CheckpointStore
from server.federation import client_config, run_federation
from server.history import RunHistory
from server.round_loop import run_rounds
from server.run_state import capture, restore
from server.secure_round import SecureRound
from server.strategy import run_strategy
from server.timing import PhaseTimes, TimedGrid

SMALL = RunConfig.of(num_tasks=3, rounds_per_task=2, local_epochs=1, quiet=True)


class Crash(BaseException):
    """The server process dies: no handler in the run catches it (a secure round catches Exception)."""


def crashing(grid: InProcessGrid, crash_in: int) -> InProcessGrid:
    """``grid``, whose server dies while the clients train round ``crash_in`` (a secure
    round's stages are messages of one group)."""
    deliver, trained = grid.send_and_receive, set()

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            trained.add(messages[0].metadata.group_id or len(trained))  # fedtide's own: one send a round
            if len(trained) == crash_in:
                raise Crash
        return deliver(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive
    return grid


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def _rounds(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("seconds")
    return lines


def _journal(path: Path) -> list[dict]:
    """The entries of a journal file (each line: index, checksum, JSON)."""
    return [json.loads(line.split(" ", 2)[2]) for line in path.read_text().splitlines()]


def _rewrite_checkpoint(path: Path, **changes) -> None:
    """Change a checkpoint's JSON (a key set to None is removed), keeping its checksum valid."""
    import hashlib

    body = json.loads(path.read_text())["checkpoint"]
    body.update(changes)
    body = {k: v for k, v in body.items() if v is not None}
    text = json.dumps(body, sort_keys=True)
    path.write_text(json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "checkpoint": body}) + "\n")


def _flip_byte(path: Path, line: int) -> None:
    """Change one byte in the middle of line ``line`` (0-based) of ``path``."""
    data = bytearray(path.read_bytes())
    start = [0, *(i + 1 for i, b in enumerate(data) if b == ord("\n"))][line]
    data[start + 200] ^= 0x04
    path.write_bytes(bytes(data))


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert list(wa) == list(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert _rounds(a) == _rounds(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["accuracy_matrix"] == sb["accuracy_matrix"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """SMALL run uninterrupted: what every resumed SMALL run must equal. Read only."""
    out = tmp_path_factory.mktemp("whole")
    run_inprocess(SMALL.replace(out=str(out)))
    return out


def _crash(config: RunConfig, crash_in: int, workers: int = 1) -> None:
    if workers > 1:
        grid = WorkerPoolGrid(node_configs(config), workers)
    else:
        grid = InProcessGrid(client_app, node_configs(config), train_many=train_many)
    try:
        with pytest.raises(Crash):
            run_federation(crashing(grid, crash_in), config)
    finally:
        grid.close()


def test_checkpoint_round_trip_keeps_weights_fedadam_moments_history_and_rng(tmp_path):
    config = SMALL.replace(strategy="fedadam", react_server=True, out=str(tmp_path))
    schedule = build_scenario(config.data, config.seed).schedule
    history = RunHistory(schedule)
    history.close_round(0, [0.1, 0.2, 0.3], 0.5)
    history.client_reply(3, {"num-examples": 10, "drift-detected": 1})
    history.close_round(1, [0.4, 0.5, 0.6], 0.5)
    strategy = run_strategy(config, history)
    gen = np.random.default_rng(0)
    drift_response = strategy.hooks[-1]
    strategy.step.load_state({"m_t": {"w": gen.normal(size=(3, 4)), "b": gen.normal(size=4)},
                              "v_t": {"w": gen.random((3, 4)), "b": gen.random(4)}})
    drift_response.load_state({"drift_response": {"to_boost": [3], "sample_all_next": True, "boosted_rounds": [1]}})
    arrays = ArrayRecord({"w": torch.randn(3, 4), "b": torch.randn(4)})
    random.seed(7)
    random.random()
    nodes = {1: {"fedtide-state/replay.x": torch.rand(2, 5)}, 2: {}}
    store = CheckpointStore(tmp_path)
    store.save(capture(1, arrays, strategy, history, nodes, {"node_states": True, "vectorize": True}))
    expected_random, expected_torch = random.random(), torch.rand(3)

    random.seed(99)
    torch.manual_seed(99)
    checkpoint = store.latest(warn=pytest.fail)
    fresh_history = RunHistory(schedule)
    fresh = run_strategy(config, fresh_history)
    restored = restore(checkpoint, fresh, fresh_history)
    assert list(restored) == ["w", "b"]  # the model's array order survives safetensors' sorting
    assert all(np.array_equal(restored[k].numpy(), arrays[k].numpy()) for k in arrays)
    for name in ("m_t", "v_t"):
        assert list(getattr(fresh.step, name)) == ["w", "b"]
        assert all(np.array_equal(getattr(fresh.step, name)[k], getattr(strategy.step, name)[k]) for k in ("w", "b"))
        assert getattr(fresh.step, name)["w"].dtype == np.float64
    assert fresh.state()["drift_response"] == {"to_boost": [3], "sample_all_next": True, "boosted_rounds": [1]}
    assert [r.as_json() for r in fresh_history.rounds] == [r.as_json() for r in history.rounds]
    assert fresh_history.baseline == [0.1, 0.2, 0.3]
    assert random.random() == expected_random
    assert torch.equal(torch.rand(3), expected_torch)
    assert torch.equal(checkpoint.nodes[1]["fedtide-state/replay.x"], nodes[1]["fedtide-state/replay.x"])
    assert checkpoint.nodes[2] == {}


def test_our_round_loop_computes_what_flowers_strategy_start_does(tmp_path):
    """A fresh run is unchanged by the switch from Flower's loop to ours (same calls, same order)."""
    config = SMALL.replace(strategy="fedavgm", fraction_train=0.6, rounds_per_task=1, out=str(tmp_path))
    scenario = build_scenario(config.data, config.seed)
    finals = []
    for loop in ("flower", "ours"):
        history = RunHistory(scenario.schedule)
        strategy = run_strategy(config, history)
        grid = InProcessGrid(client_app, node_configs(config), train_many=train_many)
        model = build_model(config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths, config.seed)
        initial = ArrayRecord(model.state_dict())
        random.seed(config.seed)
        seen = []

        def evaluate(server_round, arrays):
            seen.append((server_round, [a.numpy().sum() for a in arrays.values()]))

        kwargs = dict(train_config=client_config(config, scenario), evaluate_config=client_config(config, scenario))
        if loop == "flower":
            result = strategy.start(grid, initial, config.num_rounds, config.server.round_timeout, evaluate_fn=evaluate, **kwargs)
            final = result.arrays
        else:
            final = run_rounds(strategy, grid, initial, 1, config.num_rounds, config.server.round_timeout,
                               evaluate_fn=evaluate, after_round=lambda r, a: None, **kwargs)
        finals.append(({k: a.numpy() for k, a in final.items()}, seen))
    (flower, flower_seen), (ours, ours_seen) = finals
    assert flower_seen == ours_seen
    assert all(np.array_equal(flower[k], ours[k]) for k in flower)


def test_a_fresh_run_gives_the_figures_it_gave_before_checkpoints(tmp_path):
    """Measured before checkpoints and our round loop existed (fedadam, 2 tasks x 2 rounds;
    replay's memory as it was then: a reservoir of the stream)."""
    summary = run_inprocess(RunConfig.of(num_tasks=2, rounds_per_task=2, strategy="fedadam", quiet=True, out=str(tmp_path),
                                         memory_policy="reservoir", memory_fill="stream"))
    assert summary["acc"] == pytest.approx(0.46944444444444444, abs=1e-9)
    assert summary["bwt"] == pytest.approx(0.12777777777777777, abs=1e-9)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-2:] == ["round-000004.json", "round-000004.safetensors"]


@pytest.mark.parametrize(
    "settings",
    [
        dict(strategy="fedadam", react_server=True, fraction_train=0.6),  # moments, drift response, sampling RNG
        dict(strategy="fedavgm", method="replay+ewc+lwf"),  # momentum, every client method's state
        dict(training="local-only"),  # per-node models held by the strategy
        dict(scenario="distributed-drift", training="clustered", local_epochs=5, concept_switches=2,
             async_spread=2),  # the cluster models (spawned ones too) and who trained which
        dict(scenario="distributed-drift", training="personal-head", concept_switches=1),  # each node's head
        dict(compress="int4", dp="client", dp_clip=5.0, dp_reproducible=True),  # residuals, the budget, the noise
    ],
    ids=["fedadam-react", "fedavgm-methods", "local-only", "clustered", "personal-head", "compressed-private"],
)
def test_a_run_killed_mid_round_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path, settings):
    config = SMALL.replace(**settings)
    run_inprocess(config.replace(out=str(tmp_path / "whole")))
    crashed = config.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=4)  # rounds 1-3 completed
    assert CheckpointStore(tmp_path / "crashed").rounds()[0] == 3
    assert len(_rounds(tmp_path / "crashed")) == 3
    summary = run_inprocess(crashed, resume=True)
    assert summary["rounds"] == config.num_rounds
    _assert_same_run(tmp_path / "whole", tmp_path / "crashed")


def test_a_resumed_secure_run_quantises_as_the_uninterrupted_one_and_reports_the_whole_runs_traffic(tmp_path, monkeypatch):
    """Secure rounds quantise with stochastic rounding (unseeded), so the weights differ in
    their last digits from run to run: what must carry over is the max weight each round
    quantises with (4 x the median count of the round before) and the run's figures."""
    used: list[float] = []
    weight_for = SecureRound.weight_for
    monkeypatch.setattr(SecureRound, "weight_for", lambda self: used.append(weight_for(self)) or used[-1])
    config = SMALL.replace(secure_aggregation=True)
    whole = run_inprocess(config.replace(out=str(tmp_path / "whole")))
    whole_weights, used[:] = list(used), []
    crashed = config.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=4)  # rounds 1-3 completed
    resumed = run_inprocess(crashed, resume=True)
    assert whole_weights[0] == 10_000 and all(w < 10_000 for w in whole_weights[1:])  # counted from round 1
    assert used == whole_weights[:4] + whole_weights[3:]  # round 4 twice: it crashed, then ran again
    assert resumed["secure_aggregation"] == whole["secure_aggregation"]


def test_a_checkpoint_writes_the_states_of_the_nodes_sampled_since_the_one_before(tmp_path):
    config = SMALL.replace(clients=10, fraction_train=0.2, out=str(tmp_path))
    run_inprocess(config)
    store = CheckpointStore(tmp_path)
    sampled_only = 0
    for server_round, record in enumerate(_rounds(tmp_path), start=1):
        if server_round not in store.rounds():
            continue
        packs = json.loads(store.meta_path(server_round).read_text())["checkpoint"]["node_packs"]
        own = packs.pop(f"nodes-{server_round:06d}.safetensors")
        if not own["every"]:  # else every node's state, packed afresh
            assert own["nodes"] == sorted(c["node"] for c in record["clients"]) and len(own["nodes"]) == 2
            sampled_only += 1
        assert sorted(own["nodes"] + [n for p in packs.values() for n in p["nodes"]]) == list(range(1, 11))
    assert sampled_only
    assert store.latest(warn=pytest.fail).nodes.keys() == set(range(1, 11))


def test_node_states_are_packed_afresh_once_the_packs_since_add_up_to_a_whole_pack(tmp_path):
    store = CheckpointStore(tmp_path)
    newest: dict[int, float] = {}

    def save(server_round: int, nodes: list[int]) -> None:
        newest.update({n: float(server_round) for n in nodes})
        states = {n: {"r/x": torch.full((4096,), float(server_round))} for n in nodes}
        store.save(Checkpoint.build(server_round, {"model": {"w": torch.zeros(1)}}, {"nodes": list(range(1, 11))},
                                    nodes=states))

    with pytest.raises(ValueError, match="would hold 2 nodes' states, not the 10 it lists: pass every node's state"):
        save(0, [1, 2])  # the first save must hold every node's
    save(0, list(range(1, 11)))
    packed_afresh = []
    for server_round in range(1, 9):
        if store.full_nodes_next:
            packed_afresh.append(server_round)
        # node r's newest state stays in round r's pack, so every pack written stays in use
        save(server_round, list(range(1, 11)) if store.full_nodes_next else [server_round, 9, 10])
    assert packed_afresh == [5]  # rounds 1-4's packs hold 12 states: more than the 10 of round 0's pack
    assert {n: float(s["r/x"][0]) for n, s in store.latest(warn=pytest.fail).nodes.items()} == newest
    named = {p for r in store.rounds() for p in json.loads(store.meta_path(r).read_text())["checkpoint"]["node_packs"]}
    assert sorted(p.name for p in tmp_path.joinpath("checkpoints").glob("nodes-*")) == sorted(
        n + suffix for n in named for suffix in ("", ".copy"))


def test_a_new_run_in_an_old_runs_folder_does_not_resume_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    run_inprocess(SMALL.replace(out=str(out)))  # 6 rounds: checkpoints 4, 5, 6
    shorter = SMALL.replace(out=str(out), num_tasks=1)
    _crash(shorter, crash_in=2)  # the new, shorter run dies in round 2
    assert CheckpointStore(out).rounds() == [1, 0]  # the old run's rounds are gone
    summary = run_inprocess(shorter, resume=True)
    assert summary["rounds"] == shorter.num_rounds == 2


def test_checkpoints_keep_only_the_last_three(whole):
    store = CheckpointStore(whole)
    assert store.rounds() == [6, 5, 4]
    assert len(list((whole / "checkpoints").glob("round-*.safetensors"))) == 3
    named = {pack for r in store.rounds() for pack in json.loads(store.meta_path(r).read_text())["checkpoint"]["node_packs"]}
    assert sorted(p.name for p in (whole / "checkpoints").glob("nodes-*")) == sorted(
        name + suffix for name in named for suffix in ("", ".copy"))


@pytest.mark.parametrize("damage", ["truncate-tensors", "edit-json", "cut-journal"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, damage, whole):
    crashed = SMALL.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=5)  # checkpoints of rounds 2, 3, 4
    folder = tmp_path / "crashed" / "checkpoints"
    if damage == "truncate-tensors":
        data = (folder / "round-000004.safetensors").read_bytes()
        (folder / "round-000004.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "edit-json":
        text = (folder / "round-000004.json").read_text()
        (folder / "round-000004.json").write_text(text.replace('"round": 4', '"round": 5'))
    else:  # the journal loses its last round's line, in both its files
        for name in ("history.jsonl", "history-copy.jsonl"):
            lines = (folder / name).read_text().splitlines(keepends=True)
            (folder / name).write_text("".join(lines[:-1]))
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0
    err = capsys.readouterr().err
    reason = "both lost or damaged the line of round 4" if damage == "cut-journal" else "checksum"
    assert "checkpoint of round 4 is not usable" in err and reason in err
    _assert_same_run(whole, tmp_path / "crashed")


def test_a_partial_journal_line_left_by_a_crash_is_dropped_on_resume(tmp_path, capsys, whole):
    crashed = SMALL.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=5)
    journal = tmp_path / "crashed" / "checkpoints" / "history.jsonl"
    with journal.open("a") as handle:
        handle.write('{"round": 5, "task": 2, "task_accur')  # the server died while appending
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0
    assert "not usable" not in capsys.readouterr().err
    _assert_same_run(whole, tmp_path / "crashed")
    assert len(journal.read_text().splitlines()) == SMALL.num_rounds


def _as_format_3(folder: Path, *rounds: int) -> dict:
    """Rewrite the checkpoints of ``rounds`` as format 3 wrote them (every node's state inside
    the tensors file, no node packs), remove the packs; return the last one's JSON body."""
    bodies = [_one_as_format_3(folder, r) for r in rounds]
    for pack in folder.glob("nodes-*"):
        pack.unlink()
    return bodies[-1]


def _one_as_format_3(folder: Path, server_round: int) -> dict:
    import hashlib

    from safetensors.torch import save

    checkpoint = CheckpointStore(folder.parent).load(server_round)
    tensors = dict(checkpoint.tensors)
    order = dict(checkpoint.meta["order"])
    for node, state in checkpoint.nodes.items():
        order[f"node/{node}"] = list(state)
        tensors.update({f"node/{node}/{key}": t.clone() for key, t in state.items()})
    data = save(tensors, metadata={"format": "3"})
    (folder / f"round-{server_round:06d}.safetensors").write_bytes(data)
    meta = folder / f"round-{server_round:06d}.json"
    _rewrite_checkpoint(meta, format=3, order=order, tensors_sha256=hashlib.sha256(data).hexdigest(),
                        tensors_bytes=len(data), node_packs=None)
    return json.loads(meta.read_text())["checkpoint"]


def test_a_damaged_node_pack_is_read_from_its_copy_and_a_pack_name_out_of_the_folder_is_refused(tmp_path, capsys):
    config = SMALL.replace(clients=10, fraction_train=0.2)  # each round changes 2 of 10 states
    run_inprocess(config.replace(out=str(tmp_path / "whole")))
    crashed = config.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=5)  # checkpoints of rounds 2, 3, 4
    folder = tmp_path / "crashed" / "checkpoints"
    packs = json.loads((folder / "round-000004.json").read_text())["checkpoint"]["node_packs"]
    assert len(packs) > 1 and not packs["nodes-000004.safetensors"]["every"]
    pack = folder / "nodes-000004.safetensors"
    pack.write_bytes(pack.read_bytes()[:-10])
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "node pack(s) nodes-000004.safetensors lost or damaged; read from their copies" in err and "not usable" not in err
    _assert_same_run(tmp_path / "whole", tmp_path / "crashed")
    newest = json.loads((folder / "round-000005.json").read_text())["checkpoint"]["node_packs"]
    assert list(newest) == ["nodes-000005.safetensors"] and newest["nodes-000005.safetensors"]["every"]  # packed afresh

    store = CheckpointStore(tmp_path / "crashed")
    packs = json.loads((folder / "round-000005.json").read_text())["checkpoint"]["node_packs"]
    [(name, record)] = packs.items()
    for changes, reason in [
        (dict(node_packs={"../../model.safetensors": record}), "names a node pack '../../model.safetensors' that fedtide"),
        (dict(node_packs={name + "\n": record}), "that fedtide does not write"),
        (dict(nodes=list(range(1, 10))), "hold the states of other nodes than it lists .missing none, extra 10"),
        (dict(node_packs={name: {**record, "nodes": record["nodes"] + [99]}}), "lacks or misstates a field"),
        (dict(node_packs={name: {**record, "nodes": [1, *record["nodes"]]}}), "not a node id, or a second time"),
        (dict(node_packs={name: {**record, "nodes": ["1"]}}), "not a node id"),
        (dict(node_packs=None), "node packs are not a mapping"),  # nodes, but no packs: not what fedtide writes
        (dict(node_packs=[1, 2]), "node packs are not a mapping"),
    ]:
        _rewrite_checkpoint(folder / "round-000005.json", **{"node_packs": packs, "nodes": list(range(1, 11)), **changes})
        with pytest.raises(ValueError, match=reason):
            store.load(5)
    _rewrite_checkpoint(folder / "round-000005.json", tensors_bytes=None)
    with pytest.raises(ValueError, match="lacks or misstates a field"):
        store.load(5)


def test_a_crash_between_a_rounds_node_pack_and_its_checkpoint_resumes_from_the_round_before(tmp_path, whole):
    crashed = SMALL.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=5)  # checkpoints of rounds 2, 3, 4
    folder = tmp_path / "crashed" / "checkpoints"
    for suffix in (".json", ".safetensors"):  # round 4's pack was written, its checkpoint not
        (folder / f"round-000004{suffix}").unlink()
    assert (folder / "nodes-000004.safetensors").exists()
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0
    _assert_same_run(whole, tmp_path / "crashed")


def test_a_kept_checkpoint_that_does_not_read_keeps_every_node_pack(tmp_path):
    store = CheckpointStore(tmp_path)
    for server_round in range(4):
        if server_round == 2:
            store.meta_path(1).write_text("damaged")
        store.save(Checkpoint.build(server_round, {"model": {"w": torch.zeros(1)}}, {"nodes": [1, 2]},
                                    nodes={1 + server_round % 2: {"r/x": torch.zeros(4)}} if server_round else
                                    {1: {"r/x": torch.zeros(4)}, 2: {"r/x": torch.zeros(4)}}))
    packs = sorted(p.name for p in (tmp_path / "checkpoints").glob("nodes-*.safetensors"))
    assert packs == [f"nodes-{r:06d}.safetensors" for r in range(4)]  # round 1's may still be needed


def test_a_run_checkpointed_before_node_packs_resumes_and_packs_every_node_again(tmp_path, whole):
    crashed = SMALL.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=5)
    folder = tmp_path / "crashed" / "checkpoints"
    _as_format_3(folder, 4)
    for older in (2, 3):
        for suffix in (".json", ".safetensors"):
            (folder / f"round-{older:06d}{suffix}").unlink()
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0
    _assert_same_run(whole, tmp_path / "crashed")
    assert CheckpointStore(tmp_path / "crashed").latest(warn=pytest.fail).nodes.keys() == set(range(1, 6))


def test_a_run_checkpointed_before_the_journal_existed_still_resumes(tmp_path, whole):
    """Format 1 kept the whole history inside each checkpoint: such a checkpoint is read,
    and its history starts the journal."""
    import hashlib

    crashed = SMALL.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=5)
    folder = tmp_path / "crashed" / "checkpoints"
    body = _as_format_3(folder, 4)
    rounds = _journal(folder / "history.jsonl")[: body["journal"]["lines"]]
    legacy = {k: v for k, v in body.items() if k not in ("journal", "baseline")}
    legacy.update(format=1, history={"baseline": body["baseline"], "rounds": rounds})
    text = json.dumps(legacy, sort_keys=True)
    (folder / "round-000004.json").write_text(
        json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "checkpoint": legacy}) + "\n"
    )
    (folder / "history.jsonl").unlink()
    for older in (2, 3):
        for suffix in (".json", ".safetensors"):
            (folder / f"round-{older:06d}{suffix}").unlink()
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0
    _assert_same_run(whole, tmp_path / "crashed")
    assert len((folder / "history.jsonl").read_text().splitlines()) == SMALL.num_rounds


def test_one_flipped_byte_early_in_the_journal_costs_no_checkpoint(tmp_path, capsys, whole):
    """Every checkpoint needs the journal's early lines: the copy stands in for a damaged one."""
    crashed = SMALL.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=5)  # checkpoints of rounds 2, 3, 4
    _flip_byte(tmp_path / "crashed" / "checkpoints" / "history.jsonl", line=0)
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "lost or damaged the line of round(s) 1; read from history-copy.jsonl" in err and "not usable" not in err
    _assert_same_run(whole, tmp_path / "crashed")


def test_a_round_damaged_in_both_journal_files_costs_only_the_checkpoints_after_it(tmp_path, capsys, whole):
    crashed = SMALL.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=5)  # checkpoints of rounds 2, 3, 4
    folder = tmp_path / "crashed" / "checkpoints"
    for name in ("history.jsonl", "history-copy.jsonl"):
        _flip_byte(folder / name, line=3)  # round 4's line: only round 4's checkpoint needs it
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "checkpoint of round 4 is not usable" in err and "checkpoint of round 3" not in err
    _assert_same_run(whole, tmp_path / "crashed")
    for name in ("history.jsonl", "history-copy.jsonl"):
        _flip_byte(folder / name, line=0)  # round 1's line: every checkpoint needs it
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0  # finished: nothing to read
    (tmp_path / "crashed" / "summary.json").unlink()
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedtide: error: no usable checkpoint in") and "line of round 1" in err[-1]


def test_a_run_checkpointed_with_a_journal_of_bare_lines_still_resumes(tmp_path, whole):
    """Format 2 wrote one journal of bare JSON lines, and no settings into the checkpoints."""
    crashed = SMALL.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=5)
    folder = tmp_path / "crashed" / "checkpoints"
    _as_format_3(folder, 2, 3, 4)
    entries = _journal(folder / "history.jsonl")
    (folder / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (folder / "history-copy.jsonl").unlink()
    for path in folder.glob("round-*.json"):
        _rewrite_checkpoint(path, format=2, settings=None)
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0
    _assert_same_run(whole, tmp_path / "crashed")
    assert _journal(folder / "history-copy.jsonl") == _journal(folder / "history.jsonl")  # now with its copy


@pytest.mark.parametrize(
    "edit, change",
    [({"lr": 0.5}, "lr 0.1 -> 0.5"), ({"rounds-per-task": 1}, "rounds-per-task 2 -> 1")],
)
def test_a_config_json_edited_since_the_checkpoints_is_refused(tmp_path, capsys, edit, change):
    run = tmp_path / "run"
    _crash(SMALL.replace(out=str(run)), crash_in=3)
    settings = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**settings, **edit, "quiet": False}))  # quiet may change
    assert main(["simulate", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config.json differs from the settings" in err
    assert change in err and "quiet" not in err and "start a new run with --out" in err
    edited = RunConfig.from_mapping({**settings, **edit})  # what a server's ServerApp would be given
    with pytest.raises(FedtideError, match=change):
        run_inprocess(edited, resume=True)
    assert len(_rounds(run)) == 2  # nothing ran


def test_checkpoints_hold_client_data_so_only_their_owner_reads_them(tmp_path):
    previous = os.umask(0o022)
    try:
        config = SMALL.replace(out=str(tmp_path))
        _crash(config, crash_in=3)
        run_inprocess(config, resume=True)
    finally:
        os.umask(previous)
    folder = tmp_path / "checkpoints"
    assert folder.stat().st_mode & 0o777 == 0o700
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert set(modes.values()) == {0o600} and {"history.jsonl", "history-copy.jsonl"} <= set(modes)


def test_a_checkpoint_costs_the_same_late_in_a_run_as_early(tmp_path):
    """The history lives in one appended journal, not in every checkpoint: a checkpoint's
    JSON does not grow from round to round (with the history inside, each round added a
    line of ~1 KB to every later checkpoint)."""
    config = SMALL.replace(rounds_per_task=20, num_tasks=2, out=str(tmp_path), method="naive")
    run_inprocess(config)
    folder = tmp_path / "checkpoints"
    sizes = {int(p.stem.split("-")[1]): p.stat().st_size for p in folder.glob("round-*.json")}
    assert sorted(sizes) == [38, 39, 40]
    # the parts' state may differ by a few digits (e.g. a node's last accuracy), never by a round's history
    assert max(sizes.values()) - min(sizes.values()) < 100
    assert len(CheckpointStore(tmp_path).load(40).journal) == 40 and len((folder / "history.jsonl").read_text().splitlines()) == 40


def test_no_usable_checkpoint_is_a_one_line_error(tmp_path, capsys):
    crashed = SMALL.replace(out=str(tmp_path))
    _crash(crashed, crash_in=2)
    for path in (tmp_path / "checkpoints").glob("*.safetensors"):
        path.write_bytes(b"junk")
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedtide: error: no usable checkpoint in")


def test_resuming_a_finished_run_says_so_and_trains_nothing(tmp_path, capsys, whole):
    shutil.copytree(whole, tmp_path, dirs_exist_ok=True)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert main(["simulate", "--resume", str(tmp_path)]) == 0
    assert "already finished" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p.name != "run.lock"} == before


def test_a_run_that_died_after_its_last_checkpoint_only_writes_its_results(tmp_path, whole):
    died = tmp_path / "died"
    shutil.copytree(whole, died)
    for name in ("summary.json", "model.safetensors"):
        (died / name).unlink()
    assert main(["simulate", "--resume", str(died)]) == 0
    _assert_same_run(whole, died)


def test_bad_resume_inputs_get_one_line_errors(tmp_path, capsys):
    run = tmp_path / "run"
    _crash(SMALL.replace(out=str(run)), crash_in=2)
    no_checkpoints = tmp_path / "fresh"
    no_checkpoints.mkdir()
    (no_checkpoints / "config.json").write_text((run / "config.json").read_text())
    cases = {
        ("--resume", str(tmp_path / "missing")): "no such folder",
        ("--resume", str(tmp_path)): "no config.json",
        ("--resume", str(no_checkpoints)): "no checkpoints",
        ("--resume", str(run), "--lr", "0.5"): "--lr 0.5 (the run has 0.1) would change what the run computes",
        ("--resume", str(run), "--out", str(tmp_path / "elsewhere")): "--out",
        ("--resume", str(run), "--preset", "split-digits"): "drop --preset",
        ("--resume", str(run), "--engine", "flower"): "in-process engine only",
        ("--resume", str(run), "--no-vectorize"): "resume it without --no-vectorize too",
    }
    for argv, expected in cases.items():
        assert main(["simulate", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedtide: error:") and expected in err[0], (argv, err)
    (run / "config.json").write_text("{not json")
    assert main(["simulate", "--resume", str(run)]) == 2
    assert "config.json is unreadable" in capsys.readouterr().err


def test_resume_may_change_where_the_data_is_and_what_is_shown(tmp_path, whole):
    crashed = SMALL.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=3)
    assert main(["simulate", "--resume", str(tmp_path / "crashed"), "--quiet", "--round-timeout", "60",
                 "--lr", str(SMALL.learner.lr)]) == 0
    _assert_same_run(whole, tmp_path / "crashed")


@pytest.mark.slow
def test_worker_processes_resume_their_nodes_state(tmp_path, capsys):
    config = SMALL.replace(clients=8, fraction_train=0.5)  # each checkpoint: the states of the nodes sampled
    run_inprocess(config.replace(out=str(tmp_path / "whole")), workers=2)
    crashed = config.replace(out=str(tmp_path / "crashed"))
    _crash(crashed, crash_in=4, workers=2)
    assert main(["simulate", "--resume", str(tmp_path / "crashed"), "--workers", "1"]) == 2
    assert "started with --workers 2: resume it with that many" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(tmp_path / "crashed")]) == 0  # takes the run's own 2 workers
    _assert_same_run(tmp_path / "whole", tmp_path / "crashed")


@pytest.mark.slow
def test_a_simulation_killed_with_sigkill_resumes_from_the_command_line(tmp_path, whole):
    """A real crash: the process is killed (SIGKILL) once round 3's checkpoint exists."""
    settings = ["--num-tasks", "3", "--rounds-per-task", "2", "--local-epochs", "1", "--quiet"]  # SMALL
    command = [sys.executable, "-m", "fedtide.cli", "simulate", *settings]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], env=env)
    store, deadline = CheckpointStore(killed), time.monotonic() + 60
    while not store.rounds() or store.rounds()[0] < 3:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    completed = store.rounds()[0]
    assert completed < 6, "killed too late to test a resume"
    before = (killed / "metrics.jsonl").read_text().splitlines()
    done = subprocess.run([*command[:4], "--resume", str(killed)], env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = (killed / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before  # no finished round redone (its line would differ in seconds) or lost
    assert [json.loads(line)["round"] for line in after] == list(range(1, 7))
    _assert_same_run(whole, killed)


def test_a_simulation_cannot_go_on_under_a_runtime_that_holds_no_node_state(tmp_path):
    config = SMALL.replace(out=str(tmp_path))
    _crash(config, crash_in=2)
    deployment_like = TimedGrid(InProcessGrid(client_app, node_configs(config), train_many=train_many), PhaseTimes())
    with pytest.raises(FedtideError, match="made by a simulation"):
        run_federation(deployment_like, config, resume=True)


def test_the_server_app_resumes_when_its_run_config_says_so(tmp_path, whole):
    """`fedtide server --resume` submits the run with ``resume = true`` beside the settings."""
    from flwr.app import Context, RecordDict

    from fedtide.deployment.server_process import write_app
    from server.app import RESUME_KEY
    from server.app import main as server_main

    config = SMALL.replace(out=str(tmp_path))
    _crash(config, crash_in=4)
    assert f"{RESUME_KEY} = true" in (write_app(tmp_path / "app", config, resume=True) / "pyproject.toml").read_text()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**config.to_mapping(), RESUME_KEY: True})
    server_main(InProcessGrid(client_app, node_configs(config), train_many=train_many), context)
    _assert_same_run(whole, tmp_path)


def test_server_resume_of_a_finished_run_exits_0_before_starting_anything(tmp_path, capsys, whole):
    code = main(["server", "--insecure", "--database", str(tmp_path / "db"), "--resume", str(whole)])
    assert code == 0
    assert "already finished" in capsys.readouterr().err
    assert not (tmp_path / "db").exists() and not (whole / "superlink.log").exists()
