"""Everything a run carries from one round to the next, as a ``Checkpoint`` and back.

- the global model;
- the strategy's state between rounds, as its parts give it (``FedtideStrategy.state()``):
  FedAdam's moments, FedAvgM's momentum and float64 model, the local-only reference's
  per-node models, the drift response's pending boosts;
- the run history (what metrics.jsonl holds), in the checkpoints' shared journal;
- the RNG states: Python's ``random`` (Flower samples nodes with it), torch's and numpy's;
- each simulated node's ``context.state`` (replay memory, EWC/LwF, drift detector), when the
  runtime holds them (deployment clients keep theirs on disk);
- the run's settings, but those a resumed run may change (``RESUME_MAY_CHANGE``), so that a
  config.json edited since is refused instead of silently making another run.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.errors import FedtideError
from server.checkpoint import Checkpoint
from server.history import RoundRecord, RunHistory

# settings a resumed run may change: where the data is, what is shown, how long to wait, and
# where the run folder is (it may have been moved)
RESUME_MAY_CHANGE = ("out", "data-dir", "quiet", "round-timeout", "client-wait", "metrics-address", "serve", "track", "track-uri")


def run_settings(config: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint records: what decides the numbers of the run (as JSON has them)."""
    kept = {name: value for name, value in config.to_mapping().items() if name not in RESUME_MAY_CHANGE}
    return json.loads(json.dumps(kept))


def check_settings(recorded: dict[str, Any] | None, config: RunConfig, source: str) -> None:
    """FedtideError naming each setting of ``config`` (read from ``source``) that differs from
    what the run's checkpoints ``recorded``. A setting one of them lacks (a fedtide of another
    version) is not compared; a checkpoint that recorded none (older) passes."""
    if recorded is None:
        return
    now = run_settings(config)
    changed = [f"{name} {recorded[name]} -> {now[name]}" for name in sorted(set(recorded) & set(now))
               if recorded[name] != now[name]]
    if changed:
        raise FedtideError(
            f"{source} differs from the settings the run's checkpoints were written with ({', '.join(changed)}): "
            "put it back as it was to resume, or start a new run with --out"
        )


def capture(
    server_round: int,
    arrays: ArrayRecord,
    strategy: Any,
    history: RunHistory,
    node_states: dict[int, dict[str, torch.Tensor]] | None,
    runtime: dict[str, Any],
    settings: dict[str, Any] | None = None,
    secure: Any = None,
    node_ids: list[int] | None = None,
) -> Checkpoint:
    """The state after ``server_round`` was aggregated and evaluated; ``settings``: the run's
    (``run_settings``); ``secure``: the run's ``SecureRound``, if any; ``node_states``: the
    simulated nodes' states that changed since the checkpoint before (``Checkpoint.nodes``),
    of all ``node_ids`` (default: those in ``node_states``)."""
    groups: dict[str, dict[str, torch.Tensor]] = {"model": arrays.to_torch_state_dict()}
    meta: dict[str, Any] = {
        "task": history.schedule.newest_task(server_round) if server_round > 0 else 0,
        "baseline": history.baseline,
        "random": _python_random_state(),
        "runtime": runtime,
        "settings": settings,
        "secure": secure.state() if secure is not None else None,
    }
    strategy_groups, meta["strategy"] = _strategy_state(strategy)
    groups.update(strategy_groups)
    numpy_state = np.random.get_state()
    groups["rng"] = {"torch": torch.random.get_rng_state(), "numpy": torch.from_numpy(numpy_state[1].astype(np.int64))}
    meta["numpy_random"] = [numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])]
    meta["nodes"] = sorted(node_ids if node_ids is not None else node_states) if node_states is not None else None
    return Checkpoint.build(server_round, groups, meta, journal=history.rounds, nodes=node_states)


def restore(checkpoint: Checkpoint, strategy: Any, history: RunHistory, secure: Any = None) -> ArrayRecord:
    """Put the strategy, the secure rounds' driver, the history and the RNGs back as they
    were; return the global model."""
    meta = checkpoint.meta
    if secure is not None:
        secure.load_state(meta.get("secure"))
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
    if checkpoint.nodes is not None:
        return checkpoint.nodes
    lacking = [node for node in nodes if f"node/{node}" not in checkpoint.meta["order"]]  # format 3 and older
    if lacking:
        raise FedtideError(f"checkpoint of round {checkpoint.server_round} lists {len(lacking)} client(s) whose state it "
                           "lacks: it was not written by fedtide; resume from a copy of the run folder")
    return {int(node): checkpoint.group(f"node/{node}") for node in nodes}


def _python_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _strategy_state(strategy: Any) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The strategy's ``state()``: groups of arrays become ``strategy/<key>`` groups, the rest
    JSON in the checkpoint's meta."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, Any] = {}
    for key, value in strategy.state().items():
        if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            groups[f"strategy/{key}"] = {name: torch.from_numpy(np.array(v)) for name, v in value.items()}
        else:
            meta[key] = value
    return groups, meta


def _restore_strategy(strategy: Any, checkpoint: Checkpoint) -> None:
    state: dict[str, Any] = dict(checkpoint.meta["strategy"])
    for group in checkpoint.meta["order"]:
        if group.startswith("strategy/"):
            state[group.removeprefix("strategy/")] = {k: t.numpy() for k, t in checkpoint.group(group).items()}
    strategy.load_state(state)
