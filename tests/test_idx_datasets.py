"""MNIST-format loading: real files verify, damaged ones are refused with a clear message."""

import gzip
import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import FedtideError
from common import idx
from common.idx import parse_idx, read_idx
from common.image_datasets import FILES, load_idx_dataset
from fedtide.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="../shared/datasets not present")


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_parse_reads_shape_and_values():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(_idx(array), "x"), array)


def test_truncated_data_is_refused_not_shortened():
    content = _idx(np.zeros((10, 4, 4), dtype=np.uint8))
    with pytest.raises(FedtideError, match="truncated or corrupted"):
        parse_idx(content[:-7], "x")


def test_bad_header_is_refused():
    with pytest.raises(FedtideError, match="not an IDX file"):
        parse_idx(b"PK\x03\x04" + b"\x00" * 20, "x")


@pytest.fixture
def mnist_copy(tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(SHARED / "mnist", folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return tmp_path


@needs_shared
def test_real_mnist_loads_and_verifies():
    data = load_idx_dataset("mnist", str(SHARED))
    assert tuple(data.train.x.shape) == (60000, 1, 28, 28) and len(data.test) == 10000
    assert float(data.train.x.max()) == 1.0 and set(data.test.y.unique().tolist()) == set(range(10))


@needs_shared
def test_checksum_mismatch_is_refused(mnist_copy):
    path = mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels = bytearray(gzip.decompress(path.read_bytes()))
    labels[100] = (labels[100] + 1) % 10  # one wrong label, file otherwise perfect
    path.write_bytes(gzip.compress(bytes(labels)))
    with pytest.raises(FedtideError, match="checksum"):
        load_idx_dataset("mnist", str(mnist_copy))


@needs_shared
def test_truncated_download_is_refused(mnist_copy):
    path = mnist_copy / "mnist" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(FedtideError, match="damaged or truncated"):
        load_idx_dataset("mnist", str(mnist_copy))


def test_missing_folder_names_the_flag(tmp_path, capsys):
    code = main(["simulate", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--data-dir" in err and FILES[0] in err
    assert not (tmp_path / "r").exists()  # no half-made run folder left behind


def test_no_data_dir_at_all_names_the_flag_and_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDTIDE_DATA_DIR", raising=False)
    code = main(["simulate", "--dataset", "fashion-mnist", "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--data-dir" in err and "FEDTIDE_DATA_DIR" in err


@needs_shared
def test_split_mnist_runs_from_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTIDE_DATA_DIR", str(SHARED))
    out = tmp_path / "run"
    flags = ["--dataset", "mnist", "--method", "replay", "--rounds-per-task", "1", "--local-epochs", "1",
             "--batch-size", "64", "--clients", "3", "--quiet", "--out", str(out)]
    assert main(["simulate", *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy_matrix"][0][0] > 0.9  # the first two digits are easy


@needs_shared
def test_dataset_switch_alternates_between_two_datasets():
    from common.config import RunConfig
    from common.scenarios import build_scenario

    config = RunConfig.of(dataset="mnist", scenario="dataset-switch", num_tasks=3, clients=3, data_dir=str(SHARED))
    scenario = build_scenario(config.data, config.seed)
    mnist, fashion = load_idx_dataset("mnist", str(SHARED)), load_idx_dataset("fashion-mnist", str(SHARED))
    assert torch.equal(scenario.test_data(0).x, mnist.test.x)
    assert torch.equal(scenario.test_data(1).x, fashion.test.x)
    assert torch.equal(scenario.test_data(2).x, mnist.test.x)
    # tasks 0 and 2 share MNIST's training images between them without overlap
    first, third = scenario.train_data(0, 0).x, scenario.train_data(0, 2).x
    assert len(first) and len(third)
    assert not ({r.numpy().tobytes() for r in first} & {r.numpy().tobytes() for r in third})
    total_fashion = sum(len(scenario.train_data(c, 1)) for c in range(3))
    assert total_fashion == len(fashion.train)


def _write_idx(path: Path, array: np.ndarray) -> str:
    content = _idx(array)
    path.write_bytes(gzip.compress(content))
    return hashlib.sha256(content).hexdigest()


def test_a_verified_file_is_read_from_the_cache_until_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "x-idx3-ubyte.gz"
    array = np.arange(60, dtype=np.uint8).reshape(5, 3, 4)
    sha = _write_idx(path, array)
    assert np.array_equal(read_idx(path, sha), array)  # verified the long way, then cached
    monkeypatch.setattr(idx, "read_idx_bytes", lambda p: pytest.fail("an unchanged verified file was read again"))
    assert np.array_equal(read_idx(path, sha), array)
    monkeypatch.undo()
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", str(tmp_path / "cache"))
    _write_idx(path, array[:4])  # the file changed: the cache must not answer for it
    with pytest.raises(FedtideError, match="checksum"):
        read_idx(path, sha)


def test_reading_works_when_the_cache_cannot_be_written_or_is_off(tmp_path, monkeypatch):
    path = tmp_path / "x-idx1-ubyte.gz"
    array = np.arange(10, dtype=np.uint8)
    sha = _write_idx(path, array)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", str(blocker))
    assert np.array_equal(read_idx(path, sha), array) and np.array_equal(read_idx(path, sha), array)
    monkeypatch.setenv("FEDTIDE_CACHE_DIR", "off")
    assert np.array_equal(read_idx(path, sha), array)
