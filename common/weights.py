"""Starting from saved weights (transfer learning) and freezing layers, with checks that
name what does not fit instead of failing deep inside torch."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from common.errors import FedtideError
from common.files import load_tensors


def load_initial_weights(model: nn.Module, path: str) -> None:
    """Load a ``.safetensors`` file (e.g. a run folder's ``model.safetensors``) into ``model``."""
    file = Path(path)
    if not file.is_file():
        raise FedtideError(f"--init-from {path}: no such file; give a .safetensors file such as RUN_DIR/model.safetensors")
    try:
        weights = load_tensors(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise FedtideError(f"--init-from {path} is not a readable safetensors file ({err})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(n for n in set(expected) & set(weights) if tuple(weights[n].shape) != tuple(expected[n].shape))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing}")
        if unexpected:
            details.append(f"unexpected {unexpected}")
        if wrong:
            details.append(
                "other shapes for " + ", ".join(f"{n} {list(weights[n].shape)} vs {list(expected[n].shape)}" for n in wrong)
            )
        raise FedtideError(
            f"--init-from {path} does not fit this model ({'; '.join(details)}): "
            "use the same --model, --hidden and dataset as the run that saved it"
        )
    model.load_state_dict({n: weights[n].to(expected[n].dtype) for n in expected})


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Stop training every parameter whose name starts with one of ``prefixes``."""
    if not prefixes:
        return
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise FedtideError(
                f"--freeze {prefix}: no parameter starts with it; this model has {', '.join(names)}"
            )
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """The sha256 (hex) of a model's weights: names, dtypes, shapes and bytes, in name order.

    The same tensors give the same digest whatever the order of the mapping or the file they
    came from, so a digest computed by the server names the weights a device receives and
    keeps: a model released, sent, stored and loaded again is bit-exact when the digests agree.
    """
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().to("cpu").contiguous()
        header = f"{name}\0{str(tensor.dtype)}\0{','.join(str(d) for d in tensor.shape)}\0"
        digest.update(header.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
