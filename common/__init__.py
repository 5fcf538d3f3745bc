"""Framework-agnostic core of fedtide: config, data, scenarios, models, metrics, files.

Nothing in this package imports Flower, so every runtime shares it unchanged.
"""

from common.threads import choose_wait_policy

choose_wait_policy()  # before any fedtide module imports torch (see common.threads)
