"""Compressed updates (--compress int8|int4): the codec, error feedback, the server's unpacking
(hostile payloads refused with a reason), and a simulation that sends ~9x fewer bytes up."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zstandard
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from client.compressed_reply import RESIDUAL_PREFIX, compress_outcome
from client.rounds import TrainOutcome
from common.compression import CodecError, decode_update, encode_update, payload_bytes
from common.config import PACKED_NAME, RunConfig
from common.errors import FedtideError
from fedtide.runtimes.inprocess import run_inprocess
from server.compressed_replies import unpack_reply


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"body.weight": rng.normal(size=(64, 100)).astype(np.float32), "body.bias": np.zeros(64, np.float32),
            "steps": np.array(7, dtype=np.int64)}


@pytest.mark.parametrize("codec, qmax", [("int8", 127), ("int4", 7)])
def test_a_packed_update_decodes_to_what_the_client_says_it_sent(codec, qmax):
    rng = np.random.default_rng(0)
    update = {k: (v * 0.01 if v.dtype.kind == "f" else v) for k, v in _model(rng).items()}
    payload, sent = encode_update(update, codec)
    back = decode_update(payload, update, codec)
    assert all(np.array_equal(back[k], sent[k]) for k in update)
    error = np.abs(back["body.weight"] - update["body.weight"]).max()
    assert error <= np.abs(update["body.weight"]).max() / qmax / 2 + 1e-7  # half a step of the largest chunk
    assert back["steps"] == 7
    full = sum(v.nbytes for v in update.values())
    assert full / len(payload) > (3.5 if codec == "int8" else 7.5)


@pytest.mark.parametrize("payload, reason", [
    (b"", "not a zstandard frame"),
    (b"junk" * 10, "not a zstandard frame"),
    (zstandard.ZstdCompressor().compress(b"\0" * 10**7), "declares 10,000,000"),  # a bomb: refused by its header
    (zstandard.ZstdCompressor().compress(b"\0" * 100), "declares 100 bytes"),
    (zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 6768), "declares -1"),
    (zstandard.ZstdCompressor().compress(b"\x80" * 6768), "code outside"),
])
def test_a_payload_that_is_not_the_models_update_is_refused(payload, reason):
    model = _model(np.random.default_rng(1))
    assert payload_bytes(model, "int8") == 6768
    with pytest.raises(CodecError, match=reason):
        decode_update(payload, model, "int8")


def test_error_feedback_sends_later_what_quantisation_left_out():
    rng = np.random.default_rng(2)
    received = {"w": torch.zeros(300)}
    state: dict = {}
    total_true, total_sent = torch.zeros(300), torch.zeros(300)
    for _ in range(20):
        step = torch.from_numpy(rng.normal(size=300).astype(np.float32)) * 0.01
        outcome = compress_outcome("int4", received, TrainOutcome({"w": received["w"] + step}, {}, {}), state)
        payload = outcome.weights[PACKED_NAME].numpy().tobytes()
        total_sent += torch.from_numpy(decode_update(payload, {"w": np.zeros(300, np.float32)}, "int4")["w"])
        total_true += step
        state = outcome.state
    # what was not sent yet is exactly the residual the client keeps: nothing is lost, only late
    assert torch.allclose(total_sent + state[RESIDUAL_PREFIX + "w"], total_true, atol=1e-5)
    assert (total_sent - total_true).abs().max() < 0.01 * 3 / 7


def test_the_server_unpacks_against_the_model_it_sent_and_refuses_what_does_not_fit():
    rng = np.random.default_rng(3)
    reference = _model(rng)
    update = {k: (rng.normal(size=v.shape).astype(np.float32) * 0.01 if v.dtype.kind == "f" else v)
              for k, v in reference.items()}
    payload, sent = encode_update(update, "int8")

    def reply(packed: np.ndarray) -> RecordDict:
        return RecordDict({"arrays": ArrayRecord({PACKED_NAME: Array(packed)}), "metrics": MetricRecord({"num-examples": 5})})

    content, reason = unpack_reply(reply(np.frombuffer(payload, np.uint8)), reference, "int8")
    assert reason is None
    weights = {k: a.numpy() for k, a in content["arrays"].items()}
    assert np.allclose(weights["body.weight"], reference["body.weight"] + sent["body.weight"])
    assert unpack_reply(reply(np.frombuffer(payload, np.uint8)), reference, "none")[1].startswith("the reply is a compressed")
    assert "1-D uint8" in unpack_reply(reply(np.frombuffer(payload[:8], np.float64)), reference, "int8")[1]
    assert "refused" in unpack_reply(reply(np.frombuffer(payload, np.uint8)), {"w": np.zeros(3, np.float32)}, "int8")[1]
    plain = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in reference.items()})})
    assert unpack_reply(plain, reference, "int8") == (plain, None)  # a Flower client that does not compress


def test_a_compressed_simulation_sends_nine_times_fewer_bytes_up_and_still_learns(tmp_path):
    summaries = {}
    for codec in ("none", "int4"):
        config = RunConfig.of(num_tasks=2, rounds_per_task=3, quiet=True, out=str(tmp_path / codec), compress=codec)
        summaries[codec] = run_inprocess(config, threads=1)
    plain, packed = summaries["none"], summaries["int4"]
    assert plain["uplink_bytes_per_client_round"] / packed["uplink_bytes_per_client_round"] > 8
    assert packed["downlink_bytes_per_client_round"] == plain["downlink_bytes_per_client_round"]
    assert packed["acc"] > plain["acc"] - 0.05 and packed["rejected_replies"] == 0
    lines = [json.loads(line) for line in (tmp_path / "int4" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(line["clients"]) == 5 for line in lines)


def test_fuzzed_packed_replies_never_crash_a_compressed_run():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from reply_fuzz import fuzz_replies, run_fuzz
    from common.schedule import TaskSchedule
    from server.history import RunHistory
    from server.strategy import run_strategy

    rng = np.random.default_rng(4)
    global_arrays = {"w": rng.normal(size=(6, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    packed_kinds = []
    for seed in range(40):
        r = np.random.default_rng(seed)
        update = {k: r.normal(size=v.shape).astype(np.float32) * 0.01 for k, v in global_arrays.items()}
        payload = np.frombuffer(encode_update(update, "int8")[0], np.uint8).copy()
        if seed % 4 == 1:
            payload[len(payload) // 2] ^= 0xFF  # a damaged frame
        elif seed % 4 == 2:
            payload = payload[: len(payload) // 2]
        elif seed % 4 == 3:
            payload = np.frombuffer(zstandard.ZstdCompressor().compress(b"\x7f" * 10**6), np.uint8).copy()
        packed_kinds.append(RecordDict({"arrays": ArrayRecord({PACKED_NAME: Array(payload)}),
                                        "metrics": MetricRecord({"num-examples": 10})}))
    replies = [c for _, c in fuzz_replies(global_arrays, 60, seed=9)] + packed_kinds
    history = RunHistory(TaskSchedule.build(num_tasks=1, rounds_per_task=10, clients=10, spread=0, seed=0))
    result = run_fuzz(run_strategy(RunConfig.of(clients=10, compress="int8"), history), global_arrays, replies,
                      per_round=10)
    assert (result.crashes, result.non_finite) == (0, 0), result.errors
    assert result.accepted >= 10  # the intact packed replies (and plain honest ones) were aggregated


def test_compression_with_a_model_per_client_is_refused_in_one_line():
    from common.errors import FedtideError

    with pytest.raises(FedtideError, match="drop --compress"):
        RunConfig.of(compress="int8", training="personal-head")


def test_an_edge_client_sends_a_packed_update_and_keeps_its_residual_on_disk(tmp_path):
    from flwr.app import ConfigRecord

    from client.app import app
    from client.state_store import ClientStateStore
    from common.models import build_model
    from common.scenarios import build_scenario
    from fedtide.runtimes.inprocess import InProcessGrid
    from server.federation import client_config

    config = RunConfig.of(hidden="16", local_epochs=1, quiet=True, compress="int4")
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    np.savez(inbox / "a.npz", x=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), y=rng.integers(0, 10, 24))
    grid = InProcessGrid(app, [{"inbox": str(inbox), "state-dir": str(state)}])
    scenario = build_scenario(config.data, config.seed)
    model = build_model("mlp", scenario.input_shape, scenario.num_classes, (16,), 0)
    record = client_config(config, scenario)
    record["server-round"] = 1
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(dict(record))})
    reply = list(grid.send_and_receive([grid.create_message(content, "train", dst_node_id=1, group_id="1")]))[0]
    assert not reply.has_error()
    assert list(reply.content["arrays"].keys()) == [PACKED_NAME]
    reference = {k: v.numpy() for k, v in model.state_dict().items()}
    unpacked, reason = unpack_reply(reply.content, reference, "int4")
    assert reason is None and set(unpacked["arrays"].keys()) == set(reference)
    saved, _ = ClientStateStore(state).load()
    assert {RESIDUAL_PREFIX + name for name in reference} <= set(saved)  # survives a restart of the device


def test_a_packed_downlink_sends_four_times_fewer_bytes_down_and_learns_alike(tmp_path):
    summaries = {}
    for down in ("none", "int8"):
        config = RunConfig.of(num_tasks=2, rounds_per_task=3, quiet=True, out=str(tmp_path / down), compress="int4",
                              compress_down=down)
        summaries[down] = run_inprocess(config, threads=1)
    plain, packed = summaries["none"], summaries["int8"]
    assert packed["rejected_replies"] == 0
    assert packed["downlink_bytes_per_client_round"] * 3.5 < plain["downlink_bytes_per_client_round"]
    assert abs(packed["acc"] - plain["acc"]) < 0.02


def test_the_server_packs_each_model_once_and_a_client_refuses_a_packed_model_it_cannot_read():
    from client.packed_model import received_model
    from common.config import PACKED_MODEL_NAME
    from common.models import build_model
    from server.compressed_replies import DownlinkModel

    config = RunConfig.of(compress="int4", compress_down="int8").client
    model = build_model(config.network.model, (1, 8, 8), 10, config.network.hidden_widths, config.seed)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in model.state_dict().items()})
    downlink = DownlinkModel("int8")
    packed = downlink.pack(arrays)
    assert downlink.pack(arrays) is packed and list(packed) == [PACKED_MODEL_NAME]
    unpacked = received_model(packed, config, (1, 8, 8), 10)
    for name, tensor in model.state_dict().items():  # within half a quantisation step of each chunk
        assert torch.allclose(unpacked[name], tensor, atol=float(tensor.abs().max()) / 127 / 2 + 1e-7)
    cut = ArrayRecord({PACKED_MODEL_NAME: Array(packed[PACKED_MODEL_NAME].numpy()[:-10].copy())})
    with pytest.raises(FedtideError, match="packed model does not fit this client's model"):
        received_model(cut, config, (1, 8, 8), 10)
    with pytest.raises(FedtideError, match="does not fit"):
        received_model(packed, config, (1, 28, 28), 10)  # another model's shapes
    with pytest.raises(FedtideError, match="--compress-down none"):
        received_model(packed, RunConfig.of(compress="int4").client, (1, 8, 8), 10)


@pytest.mark.parametrize("settings, flag", [
    ({"compress_down": "int8"}, "--compress int8 or int4"),
    ({"compress": "int8", "compress_down": "int8", "training": "clustered", "scenario": "distributed-drift",
      "num_tasks": 2}, "--training clustered"),
])
def test_a_packed_downlink_that_cannot_work_is_refused_in_one_line(settings, flag):
    with pytest.raises(FedtideError, match=flag):
        RunConfig.of(**settings)
