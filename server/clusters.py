"""Clustered training: several global models, for clients that hold different concepts at once.

One global model cannot fit clients for which the same input means different labels. The
server keeps several models ("clusters", at most ``max_clusters``) and every training
message carries all of them: ``model-<id>`` array records beside ``arrays`` (the model the
node trained last, for a plain Flower client). A fedtide client measures each model's loss
on its new data before training, trains the best one and says which (``client.clusters``),
the way IFCA (Ghosh et al., NeurIPS 2020) assigns clients. The server aggregates each
cluster's replies on their own and, in the spirit of FedDrift (Jothimurugesan et al.,
AISTATS 2023):

- **spawns** a model from a reply whose best model fits its new data much worse than the
  round's replies fit theirs: its loss is more than ``margin`` above the round's median (its
  client moved to a concept no model knows). A drift the client reported and the server
  credited halves that margin. Only a reply whose losses add up can spawn (one per offered
  model, the best being its reported loss); the reply alone is the new model. When
  ``max_clusters`` are kept, the model no node trains that was trained longest ago makes
  room; with none such, the node stays with the model it chose;
- **merges** two models that fit the same clients: for most replies that trained one, the
  other's loss is within ``margin`` of the best, and so for the other's replies. A model
  with no reply this round merges away only when no node trains it at all. The merged model
  is the two averaged, weighted by their replies' weights.

Losses are in nats (mean cross-entropy). With ``oracle`` (a reference, simulation only)
there is one model per concept, each client trains its own concept's, and models are
never spawned or merged. The choice a reply claims is the client's word: a cluster that
is not one of the round's models drops the reply; losses count only when they add up, and
a merge needs the word of most replies of both models (a model whose nodes were not asked
this round is not merged). The influence bound's caps apply within each model's replies.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

log = logging.getLogger("fedtide.server")
MAX_EVENTS = 1000  # spawns and merges kept for the checkpoint (the counts cover them all)

from common.config import CANDIDATE_PREFIX, CHOICE_KEY, CHOICE_RULE_KEY, LOSS_KEY, LOSSES_KEY

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY = "arrays", "config", "metrics"


@dataclass(frozen=True)
class ClusterReply:
    """What an accepted reply says about clusters: its node, the cluster it trained, its
    aggregation weight, its best model's loss and every model's (None where it reported
    none), and whether it reported drift the server credited."""

    node: int
    cluster: int
    weight: float
    loss: float | None = None
    losses: dict[int, float] | None = None
    drift: bool = False


class ModelClusters:
    """The cluster models, which node trained which, and the spawn and merge rules."""

    def __init__(self, max_clusters: int = 8, margin: float = 1.0, oracle_concepts: int = 0) -> None:
        self.max_clusters = max_clusters
        self.margin = margin
        self.oracle_concepts = oracle_concepts
        self.models: dict[int, ArrayRecord] = {}
        self.node_cluster: dict[int, int] = {}
        self.next_id = 0
        self.events: list[dict[str, Any]] = []  # the last MAX_EVENTS spawns and merges, with their rounds
        self.spawns = self.merges = 0
        self.rounds = self.cluster_rounds = 0  # rounds seen, and the sum of the clusters after each
        self.last_trained: dict[int, int] = {}  # cluster -> the last round a reply trained it
        self.offered: list[int] = []  # the cluster ids this round's messages offered, in order

    # ---- sending ---------------------------------------------------------
    def start(self, arrays: ArrayRecord) -> None:
        """Before the first round: one model (or one per concept for the oracle), all ``arrays``."""
        if not self.models:
            for _ in range(max(self.oracle_concepts, 1)):
                self.models[self.next_id] = arrays
                self.next_id += 1

    def home(self, node: int) -> int:
        """The cluster a node is sent as its ``arrays``: the one it trained last, else the largest."""
        cluster = self.node_cluster.get(node)
        return cluster if cluster in self.models else self.largest()

    def largest(self) -> int:
        members = {c: 0 for c in self.models}
        for cluster in self.node_cluster.values():
            if cluster in members:
                members[cluster] += 1
        return max(members, key=lambda c: (members[c], -c))

    def configure(self, messages: list[Message]) -> list[Message]:
        rule = "oracle" if self.oracle_concepts else "loss"
        self.offered = sorted(self.models)
        for message in messages:
            content = RecordDict(dict(message.content))
            content[ARRAYS_KEY] = self.models[self.home(message.metadata.dst_node_id)]
            for cluster, model in self.models.items():
                content[f"{CANDIDATE_PREFIX}{cluster}"] = model
            config = ConfigRecord(dict(content[CONFIG_KEY]))
            config[CHOICE_RULE_KEY] = rule
            content[CONFIG_KEY] = config
            message.content = content
        return messages

    # ---- receiving -------------------------------------------------------
    def claimed(self, content: RecordDict, node: int) -> tuple[int | None, str | None]:
        """(the cluster a reply trained, None) or (None, why the reply is dropped). A reply
        that names none trained the model it was sent as ``arrays``."""
        try:
            value = content.metric_records[METRICS_KEY].get(CHOICE_KEY) if METRICS_KEY in content.metric_records else None
        except Exception:  # whatever a client sends must not crash the server
            return None, "its metrics cannot be read"
        if value is None:
            return self.home(node), None
        cluster = _whole_number(value)
        if cluster is None or cluster not in self.models:
            shown = repr(value)[:24]
            return None, f"metric '{CHOICE_KEY}' = {shown} is not one of this round's models {sorted(self.models)}"
        return cluster, None

    def reference(self, cluster: int) -> dict[str, np.ndarray]:
        return {name: array.numpy() for name, array in self.models[cluster].items()}

    def spawners(self, replies: list[ClusterReply]) -> list[int]:
        """Indices of the replies that start a model of their own (see the module docstring)."""
        if self.oracle_concepts or len(replies) < 3:
            return []
        losses = [r.loss for r in replies if r.loss is not None and r.losses is not None]
        if len(losses) < 3:
            return []
        median = float(np.median(losses))
        room = self.max_clusters - len(self.models) + len(self._unused())
        out = []
        for index, reply in enumerate(replies):
            margin = self.margin / 2 if reply.drift else self.margin
            if reply.losses is not None and reply.loss is not None and reply.loss > median + margin and len(out) < room:
                out.append(index)
        return out

    def _unused(self) -> list[int]:
        """Clusters no node trains, the one trained longest ago first."""
        used = set(self.node_cluster.values())
        return sorted((c for c in self.models if c not in used), key=lambda c: (self.last_trained.get(c, -1), c))

    def finish_round(self, server_round: int, replies: list[ClusterReply], aggregated: dict[int, ArrayRecord],
                     spawned: dict[int, ArrayRecord]) -> None:
        """Take the round's models: ``aggregated`` per cluster, ``spawned`` per reply index
        (each a new cluster for its node); then merge the models that fit the same clients."""
        self.models.update(aggregated)
        for cluster in aggregated:
            self.last_trained[cluster] = server_round
        for index, reply in enumerate(replies):
            if index not in spawned:
                self.node_cluster[reply.node] = reply.cluster
        for index, model in spawned.items():
            if len(self.models) >= self.max_clusters:
                unused = self._unused()
                if not unused:  # every model is some node's: the reply stays with the model it trained
                    self.node_cluster[replies[index].node] = replies[index].cluster
                    continue
                del self.models[unused[0]]
                self.last_trained.pop(unused[0], None)
                self._event({"round": server_round, "retired": unused[0]})
            cluster = self.next_id
            self.next_id += 1
            self.models[cluster] = model
            self.last_trained[cluster] = server_round
            replies[index] = ClusterReply(replies[index].node, cluster, replies[index].weight)  # no losses: it
            # fits its own model by construction, which must not merge it back this round
            self.node_cluster[replies[index].node] = cluster
            self.spawns += 1
            self._event({"round": server_round, "spawned": cluster, "node": replies[index].node})
            log.info("round %d: node %s fits no model: new model %d from its update", server_round,
                     replies[index].node, cluster)
        if not self.oracle_concepts:
            self._merge(server_round, replies)
        self.rounds += 1
        self.cluster_rounds += len(self.models)

    def _event(self, event: dict[str, Any]) -> None:
        self.events = [*self.events[-(MAX_EVENTS - 1):], event]

    def _merge(self, server_round: int, replies: list[ClusterReply]) -> None:
        merged = True
        while merged and len(self.models) > 1:
            merged = False
            for keep, drop in self._mergeable(replies):
                if keep in self.models and drop in self.models:
                    self._combine(server_round, keep, drop, replies)
                    merged = True
                    break

    def _mergeable(self, replies: list[ClusterReply]) -> list[tuple[int, int]]:
        """(kept, dropped) pairs: the dropped model fits the kept one's clients within the
        margin, and (if it had replies) the kept one fits its clients too."""
        by_cluster: dict[int, list[ClusterReply]] = {}
        for reply in replies:
            by_cluster.setdefault(reply.cluster, []).append(reply)

        def fits(members: list[ClusterReply], other: int) -> bool:
            close = [r for r in members if r.losses and r.loss is not None and other in r.losses
                     and r.losses[other] <= r.loss + self.margin]
            return len(close) * 2 > len(members)

        trained = set(self.node_cluster.values())
        pairs = []
        for cluster, members in sorted(by_cluster.items()):
            for other in sorted(self.models):
                if other == cluster or not fits(members, other):
                    continue
                if other in by_cluster and not fits(by_cluster[other], cluster):
                    continue
                if other not in by_cluster and other in trained:
                    continue  # its nodes were not asked this round: their word is missing
                pairs.append((min(cluster, other), max(cluster, other)))
        return pairs

    def _combine(self, server_round: int, keep: int, drop: int, replies: list[ClusterReply]) -> None:
        weight = {c: sum(r.weight for r in replies if r.cluster == c) for c in (keep, drop)}
        if weight[drop] == 0:
            model = self.models[keep]  # the dropped model trained no one this round: nothing to add
        elif weight[keep] == 0:
            model = self.models[drop]
        else:
            share = weight[drop] / (weight[keep] + weight[drop])
            model = ArrayRecord({
                name: Array(_mix(array.numpy(), self.models[drop][name].numpy(), share))
                for name, array in self.models[keep].items()
            })
        self.models[keep] = model
        del self.models[drop]
        self.last_trained[keep] = max(self.last_trained.get(keep, -1), self.last_trained.pop(drop, -1))
        for node, cluster in self.node_cluster.items():
            if cluster == drop:
                self.node_cluster[node] = keep
        for index, reply in enumerate(replies):
            if reply.cluster == drop:
                replies[index] = dataclasses.replace(reply, cluster=keep)
        self.merges += 1
        self._event({"round": server_round, "merged": [keep, drop]})
        log.info("round %d: models %d and %d fit the same clients: merged into %d", server_round, keep, drop, keep)

    # ---- reading ---------------------------------------------------------
    def served(self, nodes: list[int]) -> dict[int, ArrayRecord]:
        """The model each node is served: its cluster's."""
        return {node: self.models[self.home(node)] for node in nodes}

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"clusters": {
            "ids": sorted(self.models), "node_cluster": {str(n): c for n, c in self.node_cluster.items()},
            "next_id": self.next_id, "events": list(self.events), "spawns": self.spawns, "merges": self.merges,
            "rounds": self.rounds, "cluster_rounds": self.cluster_rounds,
            "last_trained": {str(c): r for c, r in self.last_trained.items()},
        }}
        for cluster, model in self.models.items():
            out[f"clusters/{cluster}"] = {name: array.numpy() for name, array in model.items()}
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        if "clusters" not in state:
            return
        saved = state["clusters"]
        self.models = {
            int(c): ArrayRecord({name: Array(a) for name, a in state[f"clusters/{c}"].items()}) for c in saved["ids"]
        }
        self.node_cluster = {int(n): int(c) for n, c in saved["node_cluster"].items()}
        self.next_id = int(saved["next_id"])
        self.events = list(saved["events"])
        self.spawns, self.merges = int(saved["spawns"]), int(saved["merges"])
        self.rounds, self.cluster_rounds = int(saved["rounds"]), int(saved["cluster_rounds"])
        self.last_trained = {int(c): int(r) for c, r in saved["last_trained"].items()}

    def summary(self) -> dict[str, Any]:
        return {
            "clusters": len(self.models),
            "mean_clusters": self.cluster_rounds / self.rounds if self.rounds else float(len(self.models)),
            "cluster_spawns": self.spawns,
            "cluster_merges": self.merges,
        }


def _whole_number(value: object) -> int | None:
    """``value`` as an int when it is a whole number (a float too), else None (bool, NaN, text...)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _mix(a: np.ndarray, b: np.ndarray, share_b: float) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        return a
    return ((1 - share_b) * a.astype(np.float64) + share_b * b.astype(np.float64)).astype(a.dtype)


def cluster_reply(node: int, cluster: int, weight: float, metrics: dict[str, Any], drift: bool,
                  offered: list[int]) -> ClusterReply:
    """A reply's cluster facts from its schema-checked metrics. Its losses count only when
    there is one per ``offered`` cluster (in that order); its best loss only when it is the
    smallest of them, as a client that chose by loss reports it."""
    losses = metrics.get(LOSSES_KEY)
    by_cluster = dict(zip(offered, losses)) if isinstance(losses, list) and len(losses) == len(offered) else None
    loss = metrics.get(LOSS_KEY)
    if by_cluster is not None and loss is not None and loss > min(by_cluster.values()) + 1e-6:
        by_cluster = None  # says it chose a model that fits worse than another: its losses do not add up
    return ClusterReply(node, cluster, weight, loss, by_cluster, drift)
