"""Pick the torch device a run trains on."""

from __future__ import annotations

import torch

from common.errors import FedtideError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FedtideError(f"--device {name} asked for a GPU but torch sees none: use --device cpu or auto")
    return torch.device(name)
