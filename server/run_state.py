"""Everything a run carries from one round to the next, as a ``Checkpoint`` and back.

- the global model;
- the strategy's state between rounds: Flower's FedOpt moments (``m_t``, ``v_t`` of FedAdam,
  FedYogi, FedAdagrad), FedAvgM's ``momentum_vector`` and ``current_arrays``, the local-only reference's per-node
  models, the drift response's pending boosts; a strategy that adds state between rounds
  must be added here;
- the run history (what metrics.jsonl holds), in the checkpoints' shared journal;
- the RNG states: Python's ``random`` (Flower samples nodes with it), torch's and numpy's;
- each simulated node's ``context.state`` (replay memory, EWC/LwF, drift detector), when the
  runtime holds them (deployment clients keep theirs on disk).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from server.checkpoint import Checkpoint
from server.history import RoundRecord, RunHistory
from server.strategy import DriftResponse

MOMENTS = ("m_t", "v_t")  # Flower FedOpt: {array name: ndarray}


def capture(
    server_round: int,
    arrays: ArrayRecord,
    strategy: Any,
    history: RunHistory,
    node_states: dict[int, dict[str, torch.Tensor]] | None,
    runtime: dict[str, Any],
) -> Checkpoint:
    """The state after ``server_round`` was aggregated and evaluated."""
    groups: dict[str, dict[str, torch.Tensor]] = {"model": arrays.to_torch_state_dict()}
    meta: dict[str, Any] = {
        "task": history.schedule.newest_task(server_round) if server_round > 0 else 0,
        "baseline": history.baseline,
        "random": _python_random_state(),
        "runtime": runtime,
    }
    strategy_groups, meta["strategy"] = _strategy_state(strategy)
    groups.update(strategy_groups)
    numpy_state = np.random.get_state()
    groups["rng"] = {"torch": torch.random.get_rng_state(), "numpy": torch.from_numpy(numpy_state[1].astype(np.int64))}
    meta["numpy_random"] = [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])]
    meta["nodes"] = sorted(node_states) if node_states is not None else None
    for node, state in (node_states or {}).items():
        groups[f"node/{node}"] = state
    return Checkpoint.build(server_round, groups, meta, journal=history.rounds)


def restore(checkpoint: Checkpoint, strategy: Any, history: RunHistory) -> ArrayRecord:
    """Put the strategy, the history and the RNGs back as they were; return the global model."""
    meta = checkpoint.meta
    history.baseline = list(meta["baseline"])
    history.rounds = [RoundRecord.from_json(line) for line in checkpoint.journal]
    _restore_strategy(strategy, checkpoint)
    version, internal, gauss = meta["random"]
    random.setstate((version, tuple(internal), gauss))
    rng = checkpoint.group("rng")
    torch.random.set_rng_state(rng["torch"])
    name, position, has_gauss, cached = meta["numpy_random"]
    np.random.set_state((name, rng["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    return ArrayRecord(checkpoint.group("model"))


def node_states(checkpoint: Checkpoint) -> dict[int, dict[str, torch.Tensor]] | None:
    """Each simulated node's state, or None when the run's runtime held none."""
    nodes = checkpoint.meta.get("nodes")
    if nodes is None:
        return None
    return {int(node): checkpoint.group(f"node/{node}") for node in nodes}


def _python_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _strategy_state(strategy: Any) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, Any] = {}
    for name in MOMENTS:
        moments = getattr(strategy, name, None)
        if moments:
            groups[f"strategy/{name}"] = {key: torch.from_numpy(np.array(v)) for key, v in moments.items()}
    momentum = getattr(strategy, "momentum_vector", None)
    if momentum is not None:  # FedAvgM: a list in the model's array order
        groups["strategy/momentum_vector"] = {str(i): torch.from_numpy(np.array(v)) for i, v in enumerate(momentum)}
    current = getattr(strategy, "current_arrays", None)
    if isinstance(current, ArrayRecord):  # FedAvgM's last model, in the float64 of its server step
        groups["strategy/current_arrays"] = current.to_torch_state_dict()
    node_arrays = getattr(strategy, "node_arrays", None)
    if node_arrays is not None:  # the local-only reference: each node's own model
        meta["node_arrays"] = list(node_arrays)  # in their order: evaluation averages over them
        for node, record in node_arrays.items():
            groups[f"strategy/node_arrays/{node}"] = record.to_torch_state_dict()
    if isinstance(strategy, DriftResponse):
        meta["drift_response"] = {
            "sample_all_next": strategy._sample_all_next,
            "to_boost": sorted(strategy._to_boost),
            "boosted_rounds": list(strategy.boosted_rounds),
        }
    return groups, meta


def _restore_strategy(strategy: Any, checkpoint: Checkpoint) -> None:
    order = checkpoint.meta["order"]
    for name in MOMENTS:
        if f"strategy/{name}" in order:
            setattr(strategy, name, {k: t.numpy() for k, t in checkpoint.group(f"strategy/{name}").items()})
    if "strategy/momentum_vector" in order:
        strategy.momentum_vector = [t.numpy() for t in checkpoint.group("strategy/momentum_vector").values()]
    if "strategy/current_arrays" in order:
        strategy.current_arrays = ArrayRecord(checkpoint.group("strategy/current_arrays"))
    meta = checkpoint.meta["strategy"]
    if "node_arrays" in meta:
        strategy.node_arrays = {
            int(node): ArrayRecord(checkpoint.group(f"strategy/node_arrays/{node}")) for node in meta["node_arrays"]
        }
    if "drift_response" in meta and isinstance(strategy, DriftResponse):
        response = meta["drift_response"]
        strategy._sample_all_next = bool(response["sample_all_next"])
        strategy._to_boost = set(response["to_boost"])
        strategy.boosted_rounds = list(response["boosted_rounds"])
