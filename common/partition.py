"""Split a training set across clients: IID, or non-IID by Dirichlet(alpha) over labels."""

from __future__ import annotations

import numpy as np

from common.errors import FedtideError


def iid_partition(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut into ``num_clients`` near-equal, disjoint parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_clients)]


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
    min_per_group: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """For every class, share its samples among clients in proportions ~ Dir(alpha).

    ``groups`` (one id per sample, e.g. the task a class belongs to) lets the caller ask
    that every client holds at least ``min_per_group`` samples of every group, so no
    client meets a task with nothing to learn from; draws are repeated until that holds.
    Raises FedtideError when no draw satisfies it (too many clients for the data).
    """
    groups = np.zeros(len(labels), dtype=np.int64) if groups is None else groups
    group_ids = np.unique(groups)
    classes = np.unique(labels)
    smallest_group = min(int(np.sum(groups == g)) for g in group_ids)
    if smallest_group < num_clients * min_per_group:
        max_tries = 0  # impossible whatever the draw: say so at once
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in classes:
            idx = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        smallest = min(
            int(np.sum(groups[part] == g)) for part in result for g in group_ids
        )
        if smallest >= min_per_group:
            return result
    raise FedtideError(
        f"could not give each of {num_clients} clients at least {min_per_group} samples "
        f"of every task with --alpha {alpha}: use fewer clients or a larger --alpha"
    )
