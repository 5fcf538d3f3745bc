"""`fedtide export`: the written file loads without fedtide, predicts like the run's model,
pruning and int8 do what they say, and a user's mistakes are one clear FedtideError."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

import common.export as export
from common.config import RunConfig
from common.errors import FedtideError
from common.evaluation import accuracy
from common.export import export_run, load_run, prune_l1
from fedtide.export_command import add_parser, run
from fedtide.runtimes.inprocess import run_inprocess

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run folder: 8x8 digits in 2 tasks, two rounds of two epochs each (a few seconds;
    enough that the model knows both tasks: a memory filled at a task's end replays the old
    task against the new one, which then takes more than one short round to learn)."""
    out = tmp_path_factory.mktemp("export") / "run"
    run_inprocess(RunConfig.of(num_tasks=2, rounds_per_task=2, local_epochs=2, out=str(out), quiet=True))
    return out


def cli(*argv: str) -> None:
    """What `fedtide export ...` does once cli.py dispatches to the command."""
    parser = argparse.ArgumentParser(prog="fedtide")
    add_parser(parser.add_subparsers(dest="command", required=True))
    run(parser.parse_args(["export", *map(str, argv)]))


def test_torchscript_loads_without_fedtide_and_predicts_like_the_original(run_dir, tmp_path, capsys):
    out = tmp_path / "edge.pt"
    cli(run_dir, "--format", "torchscript", "--out", out)
    printed = capsys.readouterr().out
    assert "original" in printed and "written:" in printed and "edge.pt" in printed
    original = load_run(run_dir)
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        assert torch.allclose(loaded(original.test.x), original.model(original.test.x), atol=1e-5)
    blocked = "import sys; sys.modules.update(common=None, fedtide=None, client=None, server=None); import torch; "
    shape = subprocess.run(
        [sys.executable, "-c", blocked + f"print(tuple(torch.jit.load({str(out)!r})(torch.zeros(3, 1, 8, 8)).shape))"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout.strip()
    assert shape == "(3, 10)"


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_pruning_reaches_the_asked_sparsity_and_is_permanent(run_dir, tmp_path, fraction):
    original, exported = export_run(run_dir, "torchscript", prune=fraction, out=tmp_path / "pruned.pt")
    loaded = torch.jit.load(str(exported.path))
    weights = {n: p for n, p in loaded.state_dict().items() if n.endswith("weight")}
    assert len(weights) == 3  # the MLP's three Linear layers
    assert not [n for n in loaded.state_dict() if "orig" in n or "mask" in n]
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    assert zeros == pytest.approx(fraction, abs=1e-3)
    assert exported.zero_fraction == pytest.approx(fraction, abs=1e-3)
    assert original.zero_fraction < 0.01
    pruned = load_run(run_dir)
    prune_l1(pruned.model, fraction)
    with torch.no_grad():
        assert torch.allclose(loaded(pruned.test.x), pruned.model(pruned.test.x), atol=1e-5)
    assert exported.accuracy == pytest.approx(accuracy(pruned.model, pruned.test, torch.device("cpu"))[0])


def test_int8_is_smaller_and_keeps_accuracy(run_dir, tmp_path):
    original, plain = export_run(run_dir, "torchscript", out=tmp_path / "float.pt")
    _, int8 = export_run(run_dir, "torchscript", quantize="int8", out=tmp_path / "int8.pt")
    assert int8.size_bytes < 0.4 * plain.size_bytes
    assert plain.accuracy == pytest.approx(original.accuracy, abs=1e-9)
    assert int8.accuracy == pytest.approx(original.accuracy, abs=0.02)
    assert original.accuracy > 0.3  # the run learnt something, so the tolerance means something


def test_default_names_and_overwrite_needs_force(run_dir, capsys):
    cli(run_dir, "--format", "torchscript", "--prune", "0.5", "--quantize", "int8")
    written = run_dir / "model-pruned50-int8.pt"
    assert written.is_file()
    before = written.read_bytes()
    with pytest.raises(FedtideError, match="already exists: pass --force"):
        cli(run_dir, "--format", "torchscript", "--prune", "0.5", "--quantize", "int8")
    assert written.read_bytes() == before
    cli(run_dir, "--format", "torchscript", "--prune", "0.5", "--quantize", "int8", "--force")
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(FedtideError, match="run's own weights"):
        cli(run_dir, "--format", "torchscript", "--out", run_dir / "model.safetensors", "--force")


def _broken_run(run_dir, tmp_path, what: str):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((run_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    if what == "no-weights":
        (broken / "model.safetensors").unlink()
    if what == "bad-weights":
        (broken / "model.safetensors").write_bytes(b"not safetensors")
    if what == "other-model":
        config["hidden"] = "32"
    (broken / "config.json").write_text("{not json" if what == "bad-config" else json.dumps(config))
    return broken


@pytest.mark.parametrize(
    "what, flags, words",
    [
        ("missing-folder", [], "no such run folder"),
        ("no-weights", [], "has no model.safetensors"),
        ("bad-config", [], "config.json is missing or not valid JSON"),
        ("bad-weights", [], "not a readable safetensors file"),
        ("other-model", [], "does not fit the model config.json describes"),
        ("ok", ["--prune", "1"], "--prune 1.0: give the fraction"),
        ("ok", ["--prune", "-0.1"], "at least 0 and below 1"),
    ],
)
def test_bad_inputs_give_one_line_fedtide_errors(run_dir, tmp_path, what, flags, words):
    folder = tmp_path / "nowhere" if what == "missing-folder" else _broken_run(run_dir, tmp_path, what)
    with pytest.raises(FedtideError) as raised:
        cli(folder, "--format", "torchscript", *flags)
    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert not list(tmp_path.rglob("*.pt"))


def test_onnx_runs_in_onnxruntime_like_the_original_and_int8_is_smaller(run_dir, tmp_path):
    import onnxruntime

    original, plain = export_run(run_dir, "onnx", out=tmp_path / "float.onnx")
    session = onnxruntime.InferenceSession(str(plain.path), providers=["CPUExecutionProvider"])
    model = load_run(run_dir)
    logits = session.run(["logits"], {"pixels": model.test.x[:50].numpy()})[0]  # batch size is free
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(logits), model.model(model.test.x[:50]), atol=1e-4)
    assert plain.accuracy == pytest.approx(original.accuracy, abs=1e-3)
    _, int8 = export_run(run_dir, "onnx", prune=0.5, quantize="int8", out=tmp_path / "int8.onnx")
    assert int8.size_bytes < 0.4 * plain.size_bytes
    assert int8.accuracy == pytest.approx(original.accuracy, abs=0.05)


def test_onnx_without_its_packages_names_the_extra(run_dir, tmp_path, monkeypatch):
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None if name == "onnxscript" else real(name))
    with pytest.raises(FedtideError) as raised:
        cli(run_dir, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert 'pip install "fedtide[onnx]"' in str(raised.value) and "onnxscript" in str(raised.value)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_choices_are_the_formats_export_knows():
    from common import export
    from fedtide import export_command

    assert set(export_command.FORMATS) == set(export.FORMATS)
    assert set(export_command.QUANTIZATIONS) == set(export.QUANTIZATIONS)
