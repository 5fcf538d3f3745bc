"""Coordination: strategies, reply validation, evaluation, the run folder, the ServerApp."""
