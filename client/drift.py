"""Drift detection on a client's prequential error stream, with River's detectors.

Each new sample's error (1 if it was mispredicted before training on it, else 0) feeds
the detector. State is kept as the error bits seen since the last detected drift (a
bounded tail): loading replays them into a fresh detector, so no detector object is ever
pickled, and the state is a plain tensor that can live in memory or on disk.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch

MAX_REPLAYED_ERRORS = 4000
# River's module and class of each detector
DETECTORS = {
    "adwin": ("adwin", "ADWIN"), "page-hinkley": ("page_hinkley", "PageHinkley"), "ddm": ("binary.ddm", "DDM"),
    "eddm": ("binary.eddm", "EDDM"), "hddm-a": ("binary.hddm_a", "HDDMA"), "hddm-w": ("binary.hddm_w", "HDDMW"),
}
# not River's KSWIN: it runs a SciPy Kolmogorov-Smirnov test per sample (minutes per client
# stream here) and imports SciPy into every training process


def _make(name: str, delta: float):
    if name not in DETECTORS:
        raise ValueError(f"unknown drift detector '{name}'")
    module, class_name = DETECTORS[name]
    detector = getattr(_river_drift_module(module), class_name)
    if name == "adwin":
        # check after every sample: client streams are short, a round may hold only ~50
        return detector(delta=delta, clock=1)
    if name == "page-hinkley":
        return detector(mode="up")
    return detector()


def _river_drift_module(name: str) -> ModuleType:
    """River's module ``river.drift.<name>``, without running the ``river.drift`` package's
    ``__init__`` when it was not imported yet: that imports River's datasets and with them
    scikit-learn and SciPy, some 80 MB in every process that trains (an edge client's
    ClientApp among them). A detector's own module imports only ``river.base``,
    ``river.stats`` and River's compiled core."""
    full_name = f"river.drift.{name}"
    if "river.drift" in sys.modules:
        return importlib.import_module(full_name)
    loaded = _LOADED.get(full_name)
    if loaded is None:
        river = importlib.util.find_spec("river")
        if river is None or not river.submodule_search_locations:
            raise ImportError("River is not installed: pip install river")
        path = f"{river.submodule_search_locations[0]}/drift/{name.replace('.', '/')}.py"
        spec = importlib.util.spec_from_file_location(full_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"this River has no {full_name}")
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        _LOADED[full_name] = loaded
    return loaded


_LOADED: dict[str, ModuleType] = {}  # detector modules loaded on their own


class DriftMonitor:
    """Feeds errors to a River detector; remembers where in this round it fired."""

    def __init__(self, name: str, delta: float = 0.01) -> None:
        self.name = name
        self.delta = delta
        self._detector = _make(name, delta)
        self._tail: list[int] = []

    def update(self, errors: torch.Tensor) -> list[int]:
        """Feed a round's error bits in order; return the positions where the error rate rose.

        A change towards fewer errors (the model improving) restarts the tail but is not
        reported: only a worse stream is drift a client must react to.
        """
        detected = []
        for position, error in enumerate(errors.tolist()):
            self._detector.update(int(error))
            self._tail.append(int(error))
            if self._detector.drift_detected:
                if _error_rose(self._tail):
                    detected.append(position)
                self._tail = []  # what came before the change no longer describes the stream
        if len(self._tail) > MAX_REPLAYED_ERRORS:
            self._tail = self._tail[-MAX_REPLAYED_ERRORS:]
        return detected

    def state(self) -> dict[str, torch.Tensor]:
        return {"errors": torch.tensor(self._tail, dtype=torch.uint8)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._detector = _make(self.name, self.delta)
        self._tail = []
        self.update(state["errors"])


def _error_rose(tail: list[int], recent: int = 32) -> bool:
    """Whether the last ``recent`` errors (at most half the tail) are more frequent than before."""
    k = min(recent, len(tail) // 2)
    if k == 0:
        return True
    before, after = tail[:-k], tail[-k:]
    return sum(after) / len(after) > sum(before) / len(before)
