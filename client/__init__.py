"""The learner: one training loop, continual-learning methods as hooks, the ClientApp adapter."""

import common  # noqa: F401, E402 - chooses how torch's threads wait, before torch loads (common.threads)
