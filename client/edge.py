"""One training round of a client on an edge device, on plain objects (no Flower types).

Data arrives as files in an inbox folder (see ``client.inbox``); the client's state and the
ledger of consumed files live on disk (see ``client.state_store``), so a restarted process
continues where the last one stopped.

Each round the client trains on the files that arrived since its last round, together with
its replay memory, and reports its prequential accuracy on them. There are no task labels
on the edge: a task boundary is a drift the client's detector found in its previous round.
At a boundary every method consolidates what it knew (``start_task``), with the replay memory
as the old data: EWC computes its Fisher on the memory, LwF keeps the model as teacher.
EWC therefore needs replay on the edge (``--method replay+ewc``); alone it has no old data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from client.feature_range import DEFAULT_FEATURE_RANGE
from client.clusters import best_choice, model_losses
from client.compressed_reply import compress_outcome
from client.inbox import QUARANTINE, collect_arrivals
from client.methods import Method, Replay, build_methods
from client.released_model import Offer, ReleasedModelStore
from client.rounds import (
    LAST_TASK_KEY,
    RoundPlan,
    TrainOutcome,
    drifted_last_round,
    finish_round,
    load_global,
    methods_state,
    model_weights,
    plan_lr,
    restore_methods,
    train_and_react,
)
from client.dp_sgd import STEPS_KEY
from client.privacy_ledger import PrivacyLedger, merge_spent
from client.state_store import ClientStateStore
from common.config import ClientSettings
from common.datasets import LabelledSplit
from common.devices import resolve_device
from common.errors import FedtideError
from common.receipt import Receipt
from common.seeding import derive_seed
from common.weights import freeze

ROUNDS_INTO_TASK_KEY = "edge.rounds-into-task"

log = logging.getLogger("fedtide.client")


def train_on_arrivals(
    config: ClientSettings,
    input_shape: tuple[int, ...],
    num_classes: int,
    server_round: int,
    weights: dict[str, torch.Tensor],
    inbox: Path,
    state_dir: Path,
    device_name: str | None = None,
    node_id: int = 0,
    feature_range: tuple[float, float] = DEFAULT_FEATURE_RANGE,
    receipt: Receipt | None = None,
    new_run: str = "fresh",
    candidates: dict[int, dict[str, torch.Tensor]] | None = None,
    offer: Offer | None = None,
) -> TrainOutcome:
    """Train the server's ``weights`` on the inbox's new files plus the replay memory.

    The released model the device holds (``client.released_model``) first predicts the new
    files' samples (reported as ``released-acc``); then the model the server ``offer``s, if any,
    replaces it when it checks out. ``released-version`` reports the version held after the round.

    With ``candidates`` (clustered training: the server's models by cluster id) the client
    trains the one with the lowest loss on its new files instead, and reports its choice and
    every candidate's loss (``client.clusters``); with no new file it trains ``weights``, the
    model it trained last.

    With no new file the round trains on the memory alone. Saves the new state and ledger
    (one atomic write) before returning: with the server's ``receipt``, as the pending round
    whose files count as consumed once a later receipt says the server kept its reply
    (``client.state_store``; ``new_run``: what a state of another run becomes). One round at
    a time holds the state folder. Besides ``client.rounds``' metrics the outcome reports
    ``new-files``, ``new-examples`` and ``quarantined`` (this round's counts; float values
    outside ``feature_range`` make a file bad, see ``client.inbox``);
    ``task-id`` counts the task boundaries (drifts) so far. Raises FedtideError when there is
    no data at all yet, or when ``weights`` do not fit the config's model.
    """
    check_input_shape(config, input_shape)
    store = ClientStateStore(state_dir)
    with store.round_lock():
        return _train_locked(config, input_shape, num_classes, server_round, weights, inbox, store, device_name,
                             node_id, feature_range, receipt, new_run, candidates or {}, offer)


def _train_locked(
    config: ClientSettings, input_shape: tuple[int, ...], num_classes: int, server_round: int,
    weights: dict[str, torch.Tensor], inbox: Path, store: ClientStateStore, device_name: str | None, node_id: int,
    feature_range: tuple[float, float], receipt: Receipt | None, new_run: str,
    candidates: dict[int, dict[str, torch.Tensor]], offer: Offer | None,
) -> TrainOutcome:
    state, ledger = store.load() if receipt is None else store.begin_round(receipt, new_run, server_round)
    spending = PrivacyLedger(store.folder) if config.privacy.dp == "sample" else None
    if spending is not None and (spent := spending.load()) is not None:
        # the ledger outlives the state: a fresh run or a reset counts on; a restored backup never lowers it
        state = {**state, STEPS_KEY: merge_spent(spent, state.get(STEPS_KEY))}
    arrivals = collect_arrivals(Path(inbox), input_shape, num_classes, ledger, feature_range)
    released = ReleasedModelStore(store.folder)
    release_metrics = released.judge_arrivals(arrivals.data.x, arrivals.data.y) if arrivals.data is not None else {}
    if offer is not None and offer.weights is not None:
        released.keep(offer, config, input_shape, num_classes)
    release_metrics["released-version"] = released.reported_version(offer)
    choice = None
    if candidates and arrivals.data is not None:
        choice = best_choice(model_losses(config, input_shape, num_classes, candidates, arrivals.data, device_name))
        weights = candidates[choice.cluster]
    outcome = learn_round(config, input_shape, num_classes, server_round, weights, state, arrivals.data,
                          device_name, node_id)
    if outcome is None:
        invalid = len(arrivals.quarantined)
        raise FedtideError(
            f"no data yet in {inbox}: put .npz (arrays x, y) or .csv (a 'label' column) files there"
            + (f"; {invalid} invalid file(s) were found (see the log and {Path(inbox) / QUARANTINE})" if invalid else "")
        )
    outcome.metrics.update({"new-files": len(arrivals.files), "quarantined": len(arrivals.quarantined),
                            **release_metrics})
    if choice is not None:
        outcome.metrics.update(choice.metrics())
    outcome = compress_outcome(config.learner.compress, weights, outcome, state)  # its residual is saved with the state
    if spending is not None and STEPS_KEY in outcome.state:
        spending.save(outcome.state[STEPS_KEY])  # before the reply leaves the device
    consumed = [
        {"name": f.name, "size": f.size, "sha256": f.sha256, "mtime_ns": f.mtime_ns, "round": server_round,
         "samples": len(f.data)}
        for f in arrivals.files
    ]
    if receipt is None:
        store.save(outcome.state, ledger + consumed)
    else:
        store.save_pending(outcome.state, ledger + consumed, server_round, receipt.run_uid)
        store.note_run_end(receipt, server_round)
    return outcome


def check_input_shape(config: ClientSettings, input_shape: tuple[int, ...]) -> None:
    if config.methods.options["replay-shift"] and len(input_shape) != 3:
        raise FedtideError(
            f"--replay-shift moves images, but this federation's samples have shape {tuple(input_shape)} "
            "instead of (channels, height, width): run the server without --replay-shift"
        )


def learn_round(
    config: ClientSettings,
    input_shape: tuple[int, ...],
    num_classes: int,
    server_round: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    new_data: LabelledSplit | None,
    device_name: str | None = None,
    node_id: int = 0,
) -> TrainOutcome | None:
    """One round of a client that sees its data as it comes, with no task labels: train the
    server's ``weights`` on ``new_data`` plus the replay memory in ``state`` (on the memory
    alone when nothing new came). A drift found last round is a task boundary. None when
    there is neither new data nor a memory; the outcome's ``state`` is the next state."""
    check_input_shape(config, input_shape)
    device = resolve_device(device_name or config.learner.device)
    model = load_global(config, input_shape, num_classes, weights).to(device)
    freeze(model, config.network.frozen_prefixes)
    boundary = drifted_last_round(state)
    task_changed = boundary or LAST_TASK_KEY not in state
    rounds_into_task = 0 if task_changed else int(state.get(ROUNDS_INTO_TASK_KEY, 0)) + 1
    lr = plan_lr(config, rounds_into_task, state, task_changed)
    # each device its own draws; methods see the rate the optimizer runs at this round
    methods = build_methods(config.methods.parts, config.methods.options, derive_seed(config.seed, node_id), lr)
    restore_methods(methods, state, device)
    memory = replay_memory(methods)
    if new_data is None and memory is None:
        return None
    if boundary:
        log.info("drift detected last round: consolidating the old concept before round %d", server_round)
        for method in methods:
            method.start_task(model, memory)
    plan = RoundPlan(
        task=int(state.get(LAST_TASK_KEY, 0)) + int(boundary),
        task_changed=task_changed,
        lr=lr,
        data=new_data if new_data is not None else memory,
        generator=torch.Generator().manual_seed(derive_seed(config.seed, node_id, server_round)),
    )
    fresh = new_data is not None
    stats, drift = train_and_react(model, plan, methods, config, state, device, observe=fresh, stream=fresh)
    outcome = finish_round(config, plan, stats, state, model_weights(model), methods_state(methods), drift)
    outcome.state[ROUNDS_INTO_TASK_KEY] = torch.tensor(rounds_into_task)
    outcome.metrics["new-examples"] = 0 if new_data is None else len(new_data)
    return outcome


def replay_memory(methods: list[Method]) -> LabelledSplit | None:
    """The samples replay keeps (its memory and the current task's stage), or None when there is
    no replay or it keeps none."""
    for method in methods:
        if isinstance(method, Replay) and (kept := method.all_samples()) is not None:
            return LabelledSplit(kept[0].clone(), kept[1].clone())
    return None
