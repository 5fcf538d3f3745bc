"""Labelled image datasets as tensors: ``x`` float32 [N, C, H, W] in [0, 1], ``y`` int64 [N].

The embedded default is scikit-learn's bundled 8x8 digits: no download, ever.
"""

from __future__ import annotations

from dataclasses import dataclass

from pathlib import Path

import numpy as np
import torch



@dataclass(frozen=True)
class LabelledSplit:
    """A train or test split held as tensors."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: LabelledSplit
    test: LabelledSplit
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (images 1797x8x8 in 0..16, labels), read straight from
    the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``: 64 pixels and the
    label per row). Importing ``sklearn.datasets`` would cost about 0.8 s of start-up (it loads
    scipy.stats); where the file is not found, that import is the fallback."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as rows:
                table = np.loadtxt(rows, delimiter=",")
            if table.shape == (1797, 65):
                return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return np.asarray(bunch.images), np.asarray(bunch.target, dtype=np.int64)


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, split stratified per class into train and test.

    The split is fixed by ``split_seed`` and independent of the run seed, so every run
    (and every client) sees the same test set.
    """
    images, labels = digits_arrays()
    images = images.astype(np.float32) / 16.0
    rng = np.random.default_rng(split_seed)
    test_idx: list[np.ndarray] = []
    train_idx: list[np.ndarray] = []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = np.sort(np.concatenate(train_idx))
    test = np.sort(np.concatenate(test_idx))
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    return Dataset(
        name="digits",
        train=LabelledSplit(x[train], y[train]),
        test=LabelledSplit(x[test], y[test]),
        num_classes=10,
    )
