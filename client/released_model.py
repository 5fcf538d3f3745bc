"""The released model on an edge device: kept in its state folder, verified, used to predict.

The server serves the federation's released model beside the model to train
(``server.release_delivery``). The device keeps it only when the weights match the sha256
they came with and fit the model the settings describe, in one file written atomically
(``released.safetensors``: the weights, with version, sha256, shape and settings in its
metadata); the digest is checked again whenever the file is read, so a damaged or altered
file is never used to predict. Before each round learns from newly arrived labelled data,
the model the device held while the data arrived predicts it: its accuracy is reported per
version (``released-acc``, and cumulatively in ``released_stats.json``), which is what the
device saw, live.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from client.rounds import load_global
from common.config import ClientSettings
from common.errors import FedtideError
from common.files import load_tensors, save_tensors_atomic, write_json_atomic
from common.weights import weights_digest

RELEASED_FILE, STATS_FILE = "released.safetensors", "released_stats.json"
MAX_VERSION = 10**12
log = logging.getLogger("fedtide.client")


@dataclass(frozen=True)
class Offer:
    """The released model a training message names (nothing checked yet), with its weights
    when the server sends them."""

    version: Any
    sha256: Any
    weights: dict[str, torch.Tensor] | None = None


@dataclass
class ReleasedModel:
    version: int
    sha256: str
    model: torch.nn.Module  # eval mode, on the CPU
    input_shape: tuple[int, ...]
    num_classes: int


class ReleasedModelStore:
    """The released model kept in ``state_dir`` (the folder is the client state's)."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = Path(state_dir)
        self.path = self.folder / RELEASED_FILE

    def held_version(self) -> int:
        """The version kept (0: none, or a file that cannot be read: it is replaced at the next
        release). Reads the file's header only; ``load`` checks the weights."""
        return self.held()[0]

    def held(self) -> tuple[int, str]:
        """(version, sha256) of the model kept; (0, '') for none or an unreadable file."""
        if not self.path.is_file():
            return 0, ""
        try:
            with safe_open(str(self.path), framework="pt") as file:
                meta = file.metadata() or {}
            return int(meta["version"]), str(meta["sha256"])
        except (OSError, SafetensorError, KeyError, ValueError):
            return 0, ""

    def reported_version(self, named: Offer | None) -> int:
        """What the reply says the device holds: its version, or 0 when the server names
        another model under that version (an earlier run's, a number given again) or the
        device holds none, so that the server sends the one it serves."""
        version, sha256 = self.held()
        if named is not None and sha256 != named.sha256:
            return 0
        return version

    def keep(self, offer: Offer, settings: ClientSettings, input_shape: tuple[int, ...], num_classes: int) -> bool:
        """Keep the offered model if it is what it claims and fits; else keep the one held,
        log why and return False."""
        problem = _check_offer(offer, settings, input_shape, num_classes)
        if problem:
            log.warning("released model not kept: %s", problem)
            return False
        save_tensors_atomic(self.path, offer.weights, metadata={
            "version": str(int(offer.version)), "sha256": offer.sha256,
            "input-shape": ",".join(str(d) for d in input_shape), "num-classes": str(num_classes),
            "settings": json.dumps(settings.to_mapping(), sort_keys=True),
        })
        return True

    def load(self) -> ReleasedModel:
        """The kept model, its weights checked against their sha256. FedtideError when there is
        none, or the file is damaged or altered."""
        if not self.path.is_file():
            raise FedtideError(f"{self.folder} holds no released model yet: a client receives one from its second round "
                               "after the server has released a version")
        try:
            with safe_open(str(self.path), framework="pt") as file:
                meta = dict(file.metadata() or {})
            weights = load_tensors(self.path)
            version, sha256 = int(meta["version"]), meta["sha256"]
            settings = ClientSettings.from_mapping(json.loads(meta["settings"]))
            input_shape = tuple(int(d) for d in meta["input-shape"].split(","))
            num_classes = int(meta["num-classes"])
        except (OSError, SafetensorError, KeyError, ValueError, TypeError, FedtideError) as err:
            raise FedtideError(f"{self.path} cannot be read ({str(err)[:80]}): the next round replaces it") from None
        if weights_digest(weights) != sha256:
            raise FedtideError(f"{self.path} does not match its sha256: it was damaged or altered; the next round "
                               "replaces it")
        model = load_global(settings, input_shape, num_classes, weights).eval()
        return ReleasedModel(version, sha256, model, input_shape, num_classes)

    def judge_arrivals(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The held model's accuracy on newly arrived labelled samples (before any training on
        them), added to the per-version tally; empty when no model is held, or the one held
        was made for other samples (an earlier run's)."""
        if not self.path.is_file():
            return {}
        try:
            released = self.load()
        except FedtideError as err:
            log.warning("%s", err)
            return {}
        if tuple(x.shape[1:]) != released.input_shape or (len(y) and int(y.max()) >= released.num_classes):
            return {}
        try:
            with torch.no_grad():
                correct = int((predict(released.model, x) == y).sum())
        except RuntimeError as err:  # a model that cannot take these samples: it answers no prediction
            log.warning("the released model cannot predict the new samples: %s", str(err).splitlines()[0][:120])
            return {}
        stats = self.stats()
        entry = stats.setdefault(str(released.version), {"seen": 0, "correct": 0})
        entry["seen"] += len(y)
        entry["correct"] += correct
        write_json_atomic(self.folder / STATS_FILE, stats)
        return {"released-acc": correct / max(len(y), 1)}

    def stats(self) -> dict[str, dict[str, int]]:
        """Per version: samples that arrived while it was held, and how many it got right."""
        try:
            data = json.loads((self.folder / STATS_FILE).read_text(encoding="utf-8"))
            return {str(k): {"seen": int(v["seen"]), "correct": int(v["correct"])} for k, v in data.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}


def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Predicted classes of ``x``, in batches."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]).argmax(dim=1) for i in range(0, len(x), batch)]) if len(x) else \
            torch.zeros(0, dtype=torch.int64)


def _check_offer(offer: Offer, settings: ClientSettings, input_shape: tuple[int, ...], num_classes: int) -> str:
    """Why the offer cannot be kept ('' when it can)."""
    version = offer.version
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version <= MAX_VERSION:
        return "its version is not a whole number in 1..10^12"
    if not isinstance(offer.sha256, str) or len(offer.sha256) != 64:
        return "its sha256 is not 64 hex digits"
    if weights_digest(offer.weights) != offer.sha256:
        return "its weights do not match their sha256"
    try:
        load_global(settings, input_shape, num_classes, offer.weights)
    except FedtideError as err:
        return str(err)
    return ""
