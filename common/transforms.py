"""Input transforms: those that define a domain-incremental task (rotation, pixel
permutation), the preprocessing (padding, standardization), and random shifts that
augment replayed memories."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.errors import FedtideError


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a batch [N, C, H, W] about the image centre; pixels outside become 0."""
    if degrees % 360 == 0:
        return x.clone()
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(matrix.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def permute_pixels(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Apply one fixed permutation of the H*W pixel positions to every image."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w)[:, :, permutation].reshape(n, c, h, w)


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad [N, C, H, W] images symmetrically to ``size`` x ``size`` (e.g. 28 -> 32)."""
    n, c, h, w = x.shape
    if size <= max(h, w):
        return x
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))


def standardize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Shift and scale pixel values by the training set's mean and standard deviation."""
    return (x - mean) / std


def random_shifts(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Move each image of [N, C, H, W] by its own random offset of up to ``max_shift`` pixels
    along each axis. Pixels that come in from outside repeat the nearest edge pixel, so
    the background stays the background whatever the standardization."""
    if max_shift == 0:
        return x
    if x.dim() != 4:
        raise FedtideError(
            f"--replay-shift moves images, but these samples have shape {tuple(x.shape[1:])} "
            "instead of (channels, height, width): drop --replay-shift"
        )
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift), mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
