"""Turn a run folder's final model into a file for edge inference: TorchScript or ONNX,
optionally pruned (L1 magnitude, made permanent) and int8-quantized (dynamic, Linear layers).

Every combination works: int8 TorchScript uses torch's dynamic quantization; int8 ONNX is
exported in float32 and then quantized by onnxruntime's dynamic quantizer, because torch's
ONNX exporters cannot translate torch's quantized Linear. The exported file's accuracy is
measured by loading it back (``torch.jit.load`` or onnxruntime), on the union of the run's
test sets of all tasks.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import io
import json
import logging
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from torch import nn
from torch.nn.utils import prune as torch_prune

from common.config import RunConfig
from common.datasets import LabelledSplit
from common.errors import FedtideError
from common.evaluation import accuracy
from common.files import load_tensors, write_bytes_atomic
from common.models import build_model

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}
QUANTIZATIONS = ("int8",)
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ONNX_INSTALL = 'pip install "fedtide[onnx]"'
CPU = torch.device("cpu")


@dataclass(frozen=True)
class RunModel:
    """A run folder's final model (float32, eval mode) and the data to judge it on."""

    config: RunConfig
    model: nn.Module
    test: LabelledSplit  # the union of every task's test set
    weights_path: Path


@dataclass(frozen=True)
class ArtefactStats:
    """One row of the export table. ``accuracy`` is None when it could not be measured."""

    name: str
    path: Path
    size_bytes: int
    gzip_bytes: int  # what the file costs over a link that compresses
    zero_fraction: float  # share of Linear/Conv weights that are exactly zero
    accuracy: float | None


def load_run(run_dir: Path, data_dir: str | None = None) -> RunModel:
    """Rebuild the model a run trained from ``config.json`` and load ``model.safetensors``.

    ``data_dir`` replaces the run's own ``data-dir`` (e.g. when the run was made elsewhere).
    Raises FedtideError for a missing folder or file, an unreadable config or weights that do
    not fit the model the config describes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedtideError(f"{run_dir}: no such run folder; give a folder written by `fedtide simulate`")
    weights_path = run_dir / "model.safetensors"
    if not weights_path.is_file():
        raise FedtideError(f"{run_dir} has no model.safetensors: only a finished run can be exported")
    try:
        settings = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedtideError(f"{run_dir / 'config.json'} is missing or not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise FedtideError(f"{run_dir / 'config.json'} is not a JSON object of run settings")
    config = RunConfig.from_mapping(settings)
    if data_dir:
        config = config.replace(data_dir=data_dir)
    from common.scenarios import build_scenario  # loads data: only once the folder looks right

    scenario = build_scenario(config.data, config.seed)
    model = build_model(config.network.model, scenario.input_shape, scenario.num_classes, config.network.hidden_widths, config.seed)
    try:
        weights = load_tensors(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise FedtideError(f"{weights_path} is not a readable safetensors file ({err})") from None
    expected = model.state_dict()
    if set(weights) != set(expected) or any(weights[n].shape != expected[n].shape for n in expected):
        raise FedtideError(
            f"{weights_path} does not fit the model config.json describes "
            f"({config.network.model}, hidden {config.network.hidden}, {config.data.dataset}): was config.json edited?"
        )
    model.load_state_dict({n: weights[n].to(expected[n].dtype) for n in expected})
    tests = [scenario.test_data(t) for t in range(config.data.num_tasks)]
    union = LabelledSplit(torch.cat([s.x for s in tests]), torch.cat([s.y for s in tests]))
    return RunModel(config, model.eval(), union, weights_path)


def prune_l1(model: nn.Module, fraction: float) -> None:
    """Zero the ``fraction`` of Linear/Conv weights with the smallest magnitude, over all
    layers at once (global L1), and make it permanent: no masks or ``weight_orig`` remain."""
    check_prune_fraction(fraction)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]
    if fraction == 0 or not layers:
        return
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=fraction)
    for module, name in layers:
        torch_prune.remove(module, name)


def check_prune_fraction(fraction: float) -> None:
    if not 0 <= fraction < 1:
        raise FedtideError(f"--prune {fraction}: give the fraction of weights to zero, at least 0 and below 1 (e.g. 0.5)")


def zero_fraction(model: nn.Module) -> float:
    """Share of exactly-zero entries among the float Linear/Conv weights of ``model``."""
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


@contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch.jit, torch.ao.quantization and the ONNX exporter warn that they are deprecated
    or that torchvision is missing; none of it is the user's business here."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "root")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of the Linear layers (weights int8, activations quantized
    on the fly); Conv layers stay float32. Returns a new module."""
    with _quiet_torch():
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def torchscript_bytes(model: nn.Module) -> bytes:
    with _quiet_torch():
        scripted = torch.jit.script(model.eval())
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def require_onnx(quantize: str | None) -> None:
    """Raise FedtideError naming the ``onnx`` extra when a package the export needs is absent
    (onnxruntime is needed for int8; without it, a float export's accuracy goes unmeasured)."""
    needed = ["onnx", "onnxscript"] + (["onnxruntime"] if quantize else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise FedtideError(f"--format onnx needs {', '.join(missing)}: {ONNX_INSTALL}, or use --format torchscript")


def onnx_bytes(model: nn.Module, example: torch.Tensor, quantize: str | None) -> bytes:
    """A float32 model as ONNX (input ``pixels`` with a free batch size, output ``logits``),
    int8 if asked via onnxruntime's dynamic quantizer."""
    require_onnx(quantize)
    batch = torch.export.Dim("batch")
    with _quiet_torch():
        program = torch.onnx.export(
            model.eval(), (example[:2],), dynamo=True, verbose=False, input_names=["pixels"],
            output_names=["logits"], dynamic_shapes=({0: batch},),
        )
        data = program.model_proto.SerializeToString()
        if not quantize:
            return data
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory() as folder:
            source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
            source.write_bytes(data)
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
            return target.read_bytes()


@torch.no_grad()
def onnx_accuracy(path: Path, test: LabelledSplit, batch_size: int = 1024) -> float | None:
    """Accuracy of an ONNX file run by onnxruntime; None when onnxruntime is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(test), batch_size):
        logits = session.run(None, {name: test.x[start : start + batch_size].numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(dim=1) == test.y[start : start + batch_size]).sum())
    return correct / max(len(test), 1)


def torchscript_accuracy(path: Path, test: LabelledSplit) -> float:
    with _quiet_torch():
        loaded = torch.jit.load(str(path), map_location=CPU)
    return accuracy(loaded, test, CPU)[0]


def default_output(run_dir: Path, fmt: str, prune: float, quantize: str | None) -> Path:
    """``RUN_DIR/model.pt``, ``model-pruned50-int8.onnx`` and the like."""
    suffix = (f"-pruned{prune * 100:g}" if prune else "") + (f"-{quantize}" if quantize else "")
    return Path(run_dir) / f"model{suffix}{FORMATS[fmt]}"


def stats(name: str, path: Path, zeros: float, acc: float | None) -> ArtefactStats:
    data = path.read_bytes()
    return ArtefactStats(name, path, len(data), len(gzip.compress(data, 6)), zeros, acc)


def export_run(
    run_dir: Path, fmt: str, prune: float = 0.0, quantize: str | None = None, out: Path | None = None,
    force: bool = False, data_dir: str | None = None,
) -> tuple[ArtefactStats, ArtefactStats]:
    """Export a run folder's model; returns the stats of the original and of the exported file.

    Raises FedtideError for an unknown format or quantization, a prune fraction outside
    [0, 1), an existing output without ``force``, missing ONNX packages, or a bad run folder.
    """
    if fmt not in FORMATS:
        raise FedtideError(f"--format {fmt}: use {' or '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise FedtideError(f"--quantize {quantize}: use {', '.join(QUANTIZATIONS)}")
    check_prune_fraction(prune)
    if fmt == "onnx":
        require_onnx(quantize)  # before any work
    out = Path(out) if out else default_output(run_dir, fmt, prune, quantize)
    if out.resolve() == (Path(run_dir) / "model.safetensors").resolve():
        raise FedtideError(f"--out {out} is the run's own weights: choose another file")
    if out.exists() and not force:
        raise FedtideError(f"{out} already exists: pass --force to overwrite it, or choose another --out")
    run = load_run(run_dir, data_dir)
    return export_model(run.model, run.test, fmt, out, prune, quantize, run.weights_path)


def export_model(
    model: nn.Module, test: LabelledSplit, fmt: str, out: Path, prune: float = 0.0, quantize: str | None = None,
    weights_path: Path | None = None,
) -> tuple[ArtefactStats, ArtefactStats]:
    """Write ``model`` (float32, eval mode; pruned in place when asked) to ``out`` as ``fmt``;
    return the stats of the original (its accuracy on ``test``; its size: ``weights_path``'s)
    and of the written file (its accuracy measured by loading it back)."""
    original_accuracy = accuracy(model, test, CPU)[0]
    original_zeros = zero_fraction(model)
    model = copy.deepcopy(model)
    prune_l1(model, prune)
    zeros = zero_fraction(model)
    if fmt == "torchscript":
        data = torchscript_bytes(quantize_int8(model) if quantize else model)
    else:
        data = onnx_bytes(model, test.x, quantize)
    try:
        write_bytes_atomic(out, data)
    except OSError as err:
        raise FedtideError(f"cannot write {out} ({err.strerror or err}): choose a writable --out") from None
    measured = torchscript_accuracy(out, test) if fmt == "torchscript" else onnx_accuracy(out, test)
    name = fmt + (f" +prune {prune:g}" if prune else "") + (f" +{quantize}" if quantize else "")
    original = stats("original", weights_path, original_zeros, original_accuracy) if weights_path else \
        ArtefactStats("original", out, 0, 0, original_zeros, original_accuracy)
    return original, stats(name, out, zeros, measured)
