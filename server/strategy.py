"""Strategies on Flower's Message API, each with every reply validated before aggregation.

``ReplyValidation`` sits in front of any Flower strategy in the MRO: it keeps the global
model's array specs when a round is configured, drops invalid or failed replies (logged,
recorded in the run history), and hands only the valid ones to the wrapped strategy.
The wire keys stay Flower's (``arrays``, ``metrics``, ``num-examples``), so vanilla
Flower clients and strategies interoperate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from common.config import RunConfig
from server.history import RunHistory
from server.validation import METRICS_KEY, ArraySpec, array_specs, check_metrics, validate_reply

log = logging.getLogger("fedtide.server")


class ReplyValidation:
    """Mixin: validate replies, then delegate to the next strategy in the MRO."""

    def __init__(self, *args, history: RunHistory, max_num_examples: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.history = history
        self.max_num_examples = max_num_examples
        self._expected: dict[str, ArraySpec] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self._expected:  # the initial model fixes names, shapes and dtypes for the run
            self._expected = array_specs(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid: list[Message] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = f"client failed: {reply.error.reason}"
            else:
                reason = validate_reply(reply.content, self._expected, self.max_num_examples)
            if reason is not None:
                log.warning("round %d: dropped reply from node %d: %s", server_round, node, reason)
                self.history.rejected_reply(server_round, node, reason)
                continue
            self.history.client_reply(node, dict(reply.content.metric_records[METRICS_KEY]))
            valid.append(reply)
        arrays, metrics = super().aggregate_train(server_round, valid)
        if metrics is not None:
            self.history.train_metrics(dict(metrics))
        if arrays is not None:
            arrays = self._in_model_dtypes(arrays)
        return arrays, metrics

    def _in_model_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Server optimizers (FedAdam, FedAvgM) compute in float64; the model stays in its dtypes."""
        if all(str(arrays[name].dtype) == spec.dtype for name, spec in self._expected.items()):
            return arrays
        return ArrayRecord({name: Array(arrays[name].numpy().astype(spec.dtype)) for name, spec in self._expected.items()})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Client-side evaluation replies carry only metrics; drop those that fail or lie."""
        valid = []
        for reply in replies:
            metrics = None if reply.has_error() else reply.content.metric_records.get(METRICS_KEY)
            if metrics is None or check_metrics(metrics, self.max_num_examples) is not None:
                continue
            valid.append(reply)
        metrics = super().aggregate_evaluate(server_round, valid)
        if metrics is not None:
            self.history.evaluate_metrics(dict(metrics))
        return metrics


class ValidatedFedAvg(ReplyValidation, FedAvg):
    pass


class ValidatedFedProx(ReplyValidation, FedProx):
    pass


class ValidatedFedAvgM(ReplyValidation, FedAvgM):
    pass


class ValidatedFedAdam(ReplyValidation, FedAdam):
    pass


def build_strategy(config: RunConfig, history: RunHistory) -> FedAvg:
    """The strategy a config names, sampling ``fraction_train`` of the nodes each round."""
    common = dict(
        history=history,
        max_num_examples=config.max_num_examples,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if config.fraction_evaluate > 0 else 0,
        min_available_nodes=config.clients,
    )
    if config.strategy == "fedprox":
        return ValidatedFedProx(proximal_mu=config.prox_mu, **common)
    if config.strategy == "fedavgm":
        return ValidatedFedAvgM(server_learning_rate=config.effective_server_lr, server_momentum=config.server_momentum, **common)
    if config.strategy == "fedadam":
        return ValidatedFedAdam(eta=config.effective_server_lr, **common)
    return ValidatedFedAvg(**common)
