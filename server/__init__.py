"""Coordination: strategies, reply validation, evaluation, the run folder, the ServerApp."""

import common  # noqa: F401, E402 - chooses how torch's threads wait, before torch loads (common.threads)
