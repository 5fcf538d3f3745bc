"""The edge client: files arriving in an inbox, state and ledger on disk across restarts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import client.inbox as inbox_module
from client.edge import train_on_arrivals
from client.inbox import collect_arrivals
from client.rounds import BOOST_KEY, LAST_TASK_KEY
from client.state_store import LOCK_FILE, STATE_FILE, ClientStateStore
from common.config import RunConfig
from common.errors import FedtideError
from common.models import build_model

SHAPE = (1, 8, 8)
CLASSES = 10


def offered(state: dict[str, torch.Tensor]) -> int:
    """Samples offered to replay so far: its memory's and the current task's stage's."""
    return int(state["replay.seen"]) + int(state.get("replay.stage.seen", 0))


@pytest.fixture
def config() -> RunConfig:
    return RunConfig.of(hidden="16", local_epochs=1, batch_size=16, memory_size=50, quiet=True)


@pytest.fixture
def weights(config) -> dict[str, torch.Tensor]:
    return build_model(config.network.model, SHAPE, CLASSES, config.network.hidden_widths, config.seed).state_dict()


@pytest.fixture
def inbox(tmp_path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def samples(n: int, seed: int, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Learnable digits-like data in the pixel range [0, 1]: class c lights up pixel row c % 8
    and column c // 8 (plus noise)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.uniform(0, 0.09, (n, *SHAPE)).astype(np.float32)
    x[np.arange(n), 0, y % 8, :] += 0.45
    x[np.arange(n), 0, :, y // 8] += 0.45
    return x, ((CLASSES - 1 - y) if flip else y)


def arrive(inbox: Path, name: str, x: np.ndarray, y: np.ndarray, mtime: int) -> Path:
    """Write as the convention asks (temp name, then rename), with a chosen arrival time."""
    tmp = inbox / f".{name}.tmp"
    with open(tmp, "wb") as handle:
        np.savez(handle, x=x, y=y)
    path = inbox / name
    os.replace(tmp, path)
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))
    return path


def run(config, weights, inbox, state_dir, server_round=1):
    return train_on_arrivals(config, SHAPE, CLASSES, server_round, weights, inbox, state_dir)


def test_each_file_is_consumed_once_across_rounds(config, weights, inbox, tmp_path):
    state = tmp_path / "state"
    arrive(inbox, "a.npz", *samples(20, 1), mtime=100)
    first = run(config, weights, inbox, state, 1)
    assert (first.metrics["new-files"], first.metrics["new-examples"]) == (1, 20)
    arrive(inbox, "b.npz", *samples(12, 2), mtime=200)
    second = run(config, first.weights, inbox, state, 2)
    assert (second.metrics["new-files"], second.metrics["new-examples"]) == (1, 12)
    assert offered(second.state) == 32  # each new sample offered to the memory once
    _, ledger = ClientStateStore(state).load()
    assert [(e["name"], e["round"], e["samples"]) for e in ledger] == [("a.npz", 1, 20), ("b.npz", 2, 12)]


def test_same_name_with_new_content_is_new_data(inbox):
    x, y = samples(5, 1)
    path = arrive(inbox, "a.npz", x, y, mtime=100)
    first = collect_arrivals(inbox, SHAPE, CLASSES, [])
    ledger = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in first.files]
    assert collect_arrivals(inbox, SHAPE, CLASSES, ledger).files == []
    os.utime(path)  # touched, same bytes: still consumed
    assert collect_arrivals(inbox, SHAPE, CLASSES, ledger).files == []
    arrive(inbox, "a.npz", x, (y + 1) % CLASSES, mtime=300)
    assert [len(f.data) for f in collect_arrivals(inbox, SHAPE, CLASSES, ledger).files] == [5]


def test_files_still_being_written_are_ignored_until_renamed(inbox):
    x, y = samples(4, 1)
    for name in (".hidden.npz", "b.npz.tmp", "c.npz.part", "d.csv.partial"):
        with open(inbox / name, "wb") as handle:
            np.savez(handle, x=x, y=y)
    (inbox / "folder.npz").mkdir()
    assert collect_arrivals(inbox, SHAPE, CLASSES, []).files == []
    os.replace(inbox / "b.npz.tmp", inbox / "b.npz")
    assert [f.name for f in collect_arrivals(inbox, SHAPE, CLASSES, []).files] == ["b.npz"]
    assert not (inbox / "quarantine").exists()


def test_files_are_read_in_arrival_order(inbox):
    arrive(inbox, "z.npz", *samples(1, 1), mtime=100)
    arrive(inbox, "a.npz", *samples(2, 2), mtime=300)
    arrive(inbox, "m.npz", *samples(3, 3), mtime=200)
    arrive(inbox, "b.npz", *samples(4, 4), mtime=200)
    arrivals = collect_arrivals(inbox, SHAPE, CLASSES, [])
    assert [f.name for f in arrivals.files] == ["z.npz", "b.npz", "m.npz", "a.npz"]
    assert arrivals.data.y.tolist() == np.concatenate([samples(n, n)[1] for n in (1, 4, 3, 2)]).tolist()


def test_bad_files_are_quarantined_and_the_round_trains_on_the_good_ones(config, weights, inbox, tmp_path, caplog):
    x, y = samples(10, 1)
    arrive(inbox, "good.npz", x, y, mtime=100)
    arrive(inbox, "labels.npz", x, y + CLASSES, mtime=101)
    arrive(inbox, "shape.npz", x[:, :, :4], y, mtime=102)
    arrive(inbox, "count.npz", x, y[:5], mtime=103)
    arrive(inbox, "nan.npz", np.full_like(x, np.nan), y, mtime=104)
    arrive(inbox, "objects.npz", x, np.array([object()] * 10), mtime=105)
    (inbox / "empty.csv").write_text("")
    (inbox / "junk.npz").write_bytes(b"not a zip file at all")
    (inbox / "nolabel.csv").write_text("a,b\n1,2\n")
    with caplog.at_level(logging.WARNING, logger="fedtide.client"):
        outcome = run(config, weights, inbox, tmp_path / "state")
    bad = {"labels.npz", "shape.npz", "count.npz", "nan.npz", "objects.npz", "empty.csv", "junk.npz", "nolabel.csv"}
    assert (outcome.metrics["new-files"], outcome.metrics["new-examples"], outcome.metrics["quarantined"]) == (1, 10, 8)
    assert {p.name for p in inbox.iterdir()} == {"good.npz", "quarantine"}
    reasons = {name: (inbox / "quarantine" / f"{name}.reason.txt").read_text() for name in bad}
    assert set(os.listdir(inbox / "quarantine")) == bad | {f"{n}.reason.txt" for n in bad}
    assert "0..9" in reasons["labels.npz"] and "[10, 1, 4, 8]" in reasons["shape.npz"]
    assert "Python objects" in reasons["objects.npz"] and "NaN" in reasons["nan.npz"]
    assert "empty" in reasons["empty.csv"] and "'label'" in reasons["nolabel.csv"]
    assert "quarantined 'junk.npz'" in caplog.text


def test_csv_and_npz_give_the_same_samples(inbox):
    x, y = samples(6, 1)
    flat = x.reshape(6, -1)
    header = ",".join([f"p{i}" for i in range(32)] + ["label"] + [f"p{i}" for i in range(32, 64)])
    rows = [",".join(map(repr, [*r[:32].tolist(), int(lab), *r[32:].tolist()])) for r, lab in zip(flat, y)]
    (inbox / "a.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    arrive(inbox, "b.npz", flat, y, mtime=int((inbox / "a.csv").stat().st_mtime) + 10)  # flat x is accepted
    csv_file, npz_file = collect_arrivals(inbox, SHAPE, CLASSES, []).files
    assert csv_file.name == "a.csv" and csv_file.data.x.shape == (6, *SHAPE)
    assert torch.equal(csv_file.data.x, npz_file.data.x) and torch.equal(csv_file.data.y, npz_file.data.y)
    assert csv_file.data.x.dtype == torch.float32 and csv_file.data.y.dtype == torch.int64


def test_uint8_pixels_are_scaled_and_floats_in_the_feature_range_kept(inbox):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)  # [N, H, W]: one channel
    arrive(inbox, "u8.npz", pixels, np.array([0, 1, 2]), mtime=100)
    arrive(inbox, "f.npz", pixels / 255.0, np.array([0.0, 1.0, 2.0]), mtime=200)
    scaled, kept = collect_arrivals(inbox, SHAPE, CLASSES, []).files
    assert torch.allclose(scaled.data.x, torch.from_numpy(pixels / 255.0).float().unsqueeze(1))
    assert torch.equal(kept.data.x, torch.from_numpy(pixels / 255.0).float().unsqueeze(1))
    assert kept.data.y.tolist() == [0, 1, 2]


def test_float_values_outside_the_feature_range_are_quarantined_unless_the_range_allows_them(inbox):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8)).astype(np.float64)  # 0..255 as floats
    arrive(inbox, "raw.npz", pixels, np.array([0, 1, 2]), mtime=100)
    assert collect_arrivals(inbox, SHAPE, CLASSES, [], feature_range=(0.0, 255.0)).files[0].data.x.max() > 1
    arrivals = collect_arrivals(inbox, SHAPE, CLASSES, [])  # default: [0, 1]
    assert arrivals.files == [] and arrivals.quarantined == ["raw.npz"]
    reason = (inbox / "quarantine" / "raw.npz.reason.txt").read_text()
    assert "outside [0, 1]" in reason and "--feature-range" in reason


def test_state_and_ledger_survive_a_restart(config, weights, inbox, tmp_path):
    state = tmp_path / "state"
    arrive(inbox, "a.npz", *samples(30, 1), mtime=100)
    first = run(config, weights, inbox, state, 1)
    tensors, ledger = ClientStateStore(state).load()  # a new process would see this
    assert set(tensors) == set(first.state)
    # the first task's samples wait in the stage (memory-fill boundary) until the client sees it end
    assert torch.equal(tensors["replay.stage.x"], first.state["replay.stage.x"]) and len(tensors["replay.stage.y"]) == 30
    assert [e["name"] for e in ledger] == ["a.npz"]
    again = run(config, first.weights, inbox, state, 2)  # restarted: nothing new, memory only
    assert again.metrics["new-files"] == 0 and again.metrics["num-examples"] == 30
    assert torch.equal(again.state["replay.stage.x"], first.state["replay.stage.x"])
    assert len(ClientStateStore(state).load()[1]) == 1


def test_the_same_seed_gives_the_same_round(config, weights, inbox, tmp_path):
    arrive(inbox, "a.npz", *samples(30, 1), mtime=100)
    one = run(config, weights, inbox, tmp_path / "one")
    two = run(config, weights, inbox, tmp_path / "two")
    other = run(config.replace(seed=1), weights, inbox, tmp_path / "other")
    assert all(torch.equal(one.weights[k], two.weights[k]) for k in one.weights)
    assert not all(torch.equal(one.weights[k], other.weights[k]) for k in one.weights)


def test_a_corrupt_state_file_is_moved_aside_and_the_client_starts_clean(config, weights, inbox, tmp_path, caplog):
    state = tmp_path / "state"
    arrive(inbox, "a.npz", *samples(20, 1), mtime=100)
    run(config, weights, inbox, state, 1)
    raw = bytearray((state / STATE_FILE).read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit pattern in the tensors' bytes
    (state / STATE_FILE).write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="fedtide.client"):
        tensors, ledger = ClientStateStore(state).load()
    assert (tensors, ledger) == ({}, [])
    assert [p.name.startswith(f"{STATE_FILE}.corrupt-") for p in state.iterdir() if p.name != LOCK_FILE] == [True]
    assert "checksum" in caplog.text
    clean = run(config, weights, inbox, state, 2)  # the ledger is gone: a.npz is new again
    assert clean.metrics["new-files"] == 1 and offered(clean.state) == 20


def test_a_state_file_that_is_not_safetensors_is_moved_aside(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"\x00" * 3)
    assert ClientStateStore(tmp_path).load() == ({}, [])
    assert not (tmp_path / STATE_FILE).exists()


def test_store_round_trips_and_refuses_an_unwritable_folder(tmp_path):
    store = ClientStateStore(tmp_path / "new" / "state")  # created
    tensors = {"a": torch.arange(3.0), "b": torch.zeros(0, dtype=torch.uint8), "c": torch.tensor(True)}
    store.save(tensors, [{"name": "x.npz", "size": 1, "sha256": "00", "round": 1, "samples": 1}])
    loaded, ledger = ClientStateStore(tmp_path / "new" / "state").load()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors) and ledger[0]["name"] == "x.npz"
    (tmp_path / "file").write_text("")
    with pytest.raises(FedtideError, match="cannot write the client state folder .*file/state"):
        ClientStateStore(tmp_path / "file" / "state")


def test_no_data_at_all_is_a_user_error(config, weights, inbox, tmp_path):
    (inbox / "bad.csv").write_text("label\nseven\n")
    with pytest.raises(FedtideError, match="no data yet in .*inbox.*1 invalid"):
        run(config, weights, inbox, tmp_path / "state")
    assert not (tmp_path / "state" / STATE_FILE).exists()


def test_weights_from_another_model_are_a_user_error(config, inbox, tmp_path):
    arrive(inbox, "a.npz", *samples(5, 1), mtime=100)
    other = build_model("mlp", SHAPE, CLASSES, (32,), 0).state_dict()
    with pytest.raises(FedtideError, match="same settings"):
        run(config, other, inbox, tmp_path / "state")


def test_replay_shift_on_flat_samples_is_a_user_error_before_training(config, inbox, tmp_path):
    flat = (64,)
    weights = build_model(config.network.model, flat, CLASSES, config.network.hidden_widths, config.seed).state_dict()
    with pytest.raises(FedtideError, match="replay-shift.*channels, height, width"):
        train_on_arrivals(config.replace(replay_shift=1), flat, CLASSES, 1, weights, inbox, tmp_path / "state")


def test_a_memory_only_round_trains_without_feeding_the_drift_detector(config, weights, inbox, tmp_path):
    state = tmp_path / "state"
    arrive(inbox, "a.npz", *samples(30, 1), mtime=100)
    first = run(config, weights, inbox, state, 1)
    memory_round = run(config, first.weights, inbox, state, 2)
    assert memory_round.metrics["num-examples"] == 30 and memory_round.metrics["new-examples"] == 0
    assert not all(torch.equal(first.weights[k], memory_round.weights[k]) for k in first.weights)
    drift_keys = {k for k in first.state if k.startswith("drift.")}
    assert drift_keys and drift_keys == {k for k in memory_round.state if k.startswith("drift.")}
    assert all(torch.equal(memory_round.state[k], first.state[k]) for k in drift_keys)
    assert "pre-acc" in first.metrics and "pre-acc" not in memory_round.metrics  # nothing new to judge the model on
    assert offered(memory_round.state) == 30


def test_a_drift_last_round_makes_a_task_boundary(config, weights, inbox, tmp_path):
    config = config.replace(method="replay+ewc")
    state = tmp_path / "state"
    arrive(inbox, "a.npz", *samples(30, 1), mtime=100)
    first = run(config, weights, inbox, state, 1)
    assert first.metrics["task-id"] == 0 and not any(k.startswith("ewc.anchor.") for k in first.state)
    store = ClientStateStore(state)
    tensors, ledger = store.load()
    store.save({**tensors, BOOST_KEY: torch.tensor(1)}, ledger)  # as if round 1 had detected drift
    arrive(inbox, "b.npz", *samples(30, 2, flip=True), mtime=200)
    second = run(config, first.weights, inbox, state, 2)
    assert second.metrics["task-id"] == 1 and int(second.state[LAST_TASK_KEY]) == 1
    anchor = {k.removeprefix("ewc.anchor."): v for k, v in second.state.items() if k.startswith("ewc.anchor.")}
    assert anchor and all(torch.equal(anchor[k], first.weights[k]) for k in anchor)  # consolidated what came in
    assert float(sum(v.sum() for k, v in second.state.items() if k.startswith("ewc.fisher."))) > 0
    third = run(config, second.weights, inbox, state, 3)  # no new drift: same task, anchor kept
    assert third.metrics["task-id"] == 1
    assert all(torch.equal(third.state[f"ewc.anchor.{k}"], anchor[k]) for k in anchor)


def test_a_real_drift_is_detected_and_consolidated_in_the_next_round(weights, inbox, tmp_path):
    config = RunConfig.of(hidden="16", local_epochs=3, lr=0.5, memory_size=50, method="replay+lwf", quiet=True)
    state = tmp_path / "state"
    for server_round in (1, 2):  # the first concept, until it is predicted well
        arrive(inbox, f"{server_round}.npz", *samples(200, server_round), mtime=100 * server_round)
        weights = run(config, weights, inbox, state, server_round).weights
    arrive(inbox, "3.npz", *samples(100, 3, flip=True), mtime=300)
    drifted = run(config, weights, inbox, state, 3)
    assert drifted.metrics["drift-detected"] == 1 and drifted.metrics["task-id"] == 0
    arrive(inbox, "4.npz", *samples(30, 4, flip=True), mtime=400)
    after = run(config, drifted.weights, inbox, state, 4)
    assert after.metrics["task-id"] == 1
    assert all(torch.equal(after.state[f"lwf.teacher.{k}"], drifted.weights[k]) for k in drifted.weights)


def test_the_state_file_is_readable_by_its_owner_only(tmp_path):
    import stat

    ClientStateStore(tmp_path).save({"replay.x": torch.zeros(2, 1, 8, 8)}, [])
    assert stat.S_IMODE((tmp_path / STATE_FILE).stat().st_mode) == 0o600  # it holds the device's own data


def test_a_consumed_file_left_in_the_inbox_is_not_read_again(config, weights, inbox, tmp_path, monkeypatch):
    state = tmp_path / "state"
    arrive(inbox, "a.npz", *samples(20, 1), mtime=100)
    run(config, weights, inbox, state, 1)
    arrive(inbox, "b.npz", *samples(12, 2), mtime=200)
    read = []
    original = inbox_module._read_unfollowed
    monkeypatch.setattr(inbox_module, "_read_unfollowed", lambda folder, name: read.append(name) or original(folder, name))
    second = run(config, weights, inbox, state, 2)
    assert second.metrics["new-files"] == 1
    assert "a.npz" not in read and "b.npz" in read  # a device's old files cost nothing per round
    arrive(inbox, "a.npz", *samples(20, 3), mtime=300)  # rewritten: new content, new time
    assert run(config, weights, inbox, state, 3).metrics["new-files"] == 1
