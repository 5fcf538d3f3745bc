"""fedtide: federated continual learning on Flower.

The public Python API, for people who build their own Flower apps (``examples/`` shows both):

- ``ContinualLearner`` (``client.continual``): fedtide's continual-learning client inside
  your own ClientApp: replay/der/ewc/lwf/prox, drift detection, state on disk;
- ``build_strategy`` and ``FedtideStrategy`` (``server.strategy``): fedtide's validated,
  robust strategy inside your own ServerApp: every reply checked before aggregation,
  robust rules, FedAvgM/FedAdam server steps, drift reactions;
- the settings they take: ``ClientSettings`` and ``RunConfig`` (``common.config``), the
  sections ``ServerSettings``, ``DriftSettings``, ``LearnerSettings``... (``common.sections``);
- ``register_method`` (``common.method_registry``) with ``Method`` (``client.methods``): a new
  continual-learning method, one class, that every command and setting then knows;
- ``FedtideError``: what every user mistake raises, with a message that says what to change.

Names load on first use, so ``import fedtide`` (and the CLI) stays fast. The rest of this
package is the command line (``cli``), the runtimes (``runtimes``) and deployment
(``deployment``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "ContinualLearner": "client.continual",
    "FedtideStrategy": "server.strategy",
    "build_strategy": "server.strategy",
    "ClientSettings": "common.config",
    "RunConfig": "common.config",
    "DataSettings": "common.sections",
    "DriftSettings": "common.sections",
    "FaultSettings": "common.sections",
    "LearnerSettings": "common.sections",
    "ModelSettings": "common.sections",
    "RunSettings": "common.sections",
    "ServerSettings": "common.sections",
    "Method": "client.methods",
    "register_method": "common.method_registry",
    "Setting": "common.settings",
    "FedtideError": "common.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fedtide' has no attribute {name!r}")
