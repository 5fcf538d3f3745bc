"""Distributed concept drift: the scenario, clustered training and its references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.clusters import choose_model
from common.config import CANDIDATE_PREFIX, CHOICE_RULE_KEY, ClientSettings, RunConfig
from common.errors import FedtideError
from common.scenarios import build_scenario
from common.schedule import TaskSchedule, concept_sequences
from common.sections import DataSettings
from fedtide.runtimes.inprocess import run_inprocess
from server.clusters import ClusterReply, ModelClusters
from server.round_hooks import PersonalHead

DRIFT = DataSettings(scenario="distributed-drift", num_tasks=4, clients=6, rounds_per_task=3, async_spread=2,
                     concept_switches=3)


# ---- the scenario -----------------------------------------------------------
def test_every_client_starts_on_concept_0_and_each_switch_moves_to_another_concept():
    sequences = concept_sequences(concepts=4, clients=200, switches=5, recur=0.5, seed=3)
    assert all(s[0] == 0 and len(s) == 6 for s in sequences)
    assert all(a != b for s in sequences for a, b in zip(s, s[1:]))
    assert {c for s in sequences for c in s} == {0, 1, 2, 3}
    assert sequences == concept_sequences(4, 200, 5, 0.5, seed=3)  # the seed decides
    assert sequences != concept_sequences(4, 200, 5, 0.5, seed=4)


def _share_back(recur: float) -> float:
    """Share of switches (from the second on) that land on a concept the client had before."""
    sequences = concept_sequences(concepts=8, clients=400, switches=4, recur=recur, seed=0)
    back = possible = 0
    for s in sequences:
        for i in range(2, len(s)):
            possible += 1
            back += s[i] in set(s[:i]) - {s[i - 1]}
    return back / possible


def test_recur_is_the_chance_that_a_switch_goes_back_to_a_concept_the_client_had():
    by_chance = _share_back(0.0)  # a switch to any other concept may land on an earlier one too
    assert _share_back(1.0) == 1.0
    assert 0 < by_chance < 0.5
    assert 0.5 <= _share_back(0.5) <= 0.5 + 0.5 * by_chance


def test_clients_switch_at_their_own_rounds_and_the_run_lasts_every_segment():
    schedule = TaskSchedule.build(4, 3, clients=6, spread=2, seed=0, switches=3, recur=0.5)
    assert schedule.num_rounds == 4 * 3 + 2
    for client in range(6):
        tasks = [schedule.task_of(client, r) for r in range(1, schedule.num_rounds + 1)]
        offset = schedule.offsets[client]
        expected = [schedule.concepts[client][min(max((r - 1 - offset) // 3, 0), 3)] for r in range(1, 15)]
        assert tasks == expected
        switch = 3 + 1 + offset  # first round of the second segment
        assert schedule.rounds_into_task(client, switch) == 0
        assert schedule.rounds_into_task(client, switch + 1) == 1
    assert len(set(schedule.offsets)) > 1  # staggered


def test_concepts_are_label_permutations_of_the_same_inputs():
    scenario = build_scenario(DRIFT, seed=0)
    maps = [task.label_map for task in scenario.tasks]
    assert torch.equal(maps[0], torch.arange(10))
    assert all(sorted(m.tolist()) == list(range(10)) for m in maps)
    assert len({tuple(m.tolist()) for m in maps}) == 4
    test0, test2 = scenario.test_data(0), scenario.test_data(2)
    assert torch.equal(test0.x, test2.x)
    assert torch.equal(maps[2][test0.y], test2.y)


def test_the_settings_refuse_what_cannot_work():
    with pytest.raises(FedtideError, match="--num-tasks 2 or more"):
        DataSettings(scenario="distributed-drift", num_tasks=1)
    with pytest.raises(FedtideError, match="cluster-oracle knows each client's concept only"):
        DataSettings(scenario="class-incremental", training="cluster-oracle")
    with pytest.raises(FedtideError, match="use fedavg or clip"):
        RunConfig.of(scenario="distributed-drift", training="clustered", aggregation="median")
    with pytest.raises(FedtideError, match="--strategy fedavg or fedprox"):
        RunConfig.of(scenario="distributed-drift", training="clustered", strategy="fedadam")


# ---- the client's choice ----------------------------------------------------
def _client() -> ClientSettings:
    return RunConfig.of(scenario="distributed-drift", num_tasks=4, clients=6, rounds_per_task=3, seed=0).client


def _trained_on(config: ClientSettings, task: int, partition: int = 0) -> dict[str, torch.Tensor]:
    from client.rounds import load_global

    scenario = build_scenario(config.data, config.seed)
    weights = {k: v for k, v in _initial(config).items()}
    model = load_global(config, scenario.input_shape, scenario.num_classes, weights)
    data = scenario.train_data(partition, task)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x), data.y).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _initial(config: ClientSettings) -> dict[str, torch.Tensor]:
    from common.models import build_model

    scenario = build_scenario(config.data, config.seed)
    return build_model(config.network.model, scenario.input_shape, scenario.num_classes,
                       config.network.hidden_widths, config.seed).state_dict()


def test_a_client_trains_the_model_that_fits_its_new_data_best():
    config = _client()
    scenario = build_scenario(config.data, config.seed)
    client, server_round = 0, 1  # every client is on concept 0 in round 1
    assert scenario.task_of(client, server_round) == 0
    candidates = {4: _trained_on(config, task=1), 7: _trained_on(config, task=0), 9: _initial(config)}
    choice = choose_model(config, client, server_round, candidates, {})
    assert choice.cluster == 7
    assert choice.losses[7] < min(choice.losses[4], choice.losses[9])
    metrics = choice.metrics()
    assert metrics["cluster"] == 7 and metrics["cluster-loss"] == choice.losses[7]
    assert metrics["cluster-losses"] == [choice.losses[4], choice.losses[7], choice.losses[9]]  # in id order


def test_the_oracle_rule_takes_the_clients_own_concept_whatever_the_losses():
    config = _client()
    scenario = build_scenario(config.data, config.seed)
    server_round = scenario.schedule.num_rounds
    client = next(c for c in range(6) if scenario.task_of(c, server_round) != 0)
    concept = scenario.task_of(client, server_round)
    candidates = {c: _trained_on(config, task=0) for c in range(4)}
    assert choose_model(config, client, server_round, candidates, {}, rule="oracle").cluster == concept


def test_a_server_asking_the_impossible_gets_a_clear_error():
    config = _client()
    with pytest.raises(FedtideError, match="choose a model by 'vote'"):
        choose_model(config, 0, 1, {0: _initial(config)}, {}, rule="vote")
    with pytest.raises(FedtideError, match="at most 64"):
        choose_model(config, 0, 1, {c: _initial(config) for c in range(65)}, {})


# ---- the server's clusters --------------------------------------------------
def _record(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))})


def _clusters(models: dict[int, float], margin: float = 1.0, max_clusters: int = 8) -> ModelClusters:
    clusters = ModelClusters(max_clusters, margin)
    clusters.models = {c: _record(v) for c, v in models.items()}
    clusters.next_id = max(models) + 1
    return clusters


def _reply(node: int, loss: float, cluster: int = 0, drift: bool = False) -> ClusterReply:
    return ClusterReply(node, cluster, 10.0, loss, {cluster: loss}, drift)


def test_a_reply_whose_best_model_fits_much_worse_than_the_rounds_starts_its_own():
    clusters = _clusters({0: 0.0})
    replies = [_reply(n, loss) for n, loss in enumerate([0.3, 0.4, 0.35, 2.0, 0.9])]
    assert clusters.spawners(replies) == [3]  # 2.0 > median 0.4 + 1.0; 0.9 is not
    drifted = [_reply(n, loss, drift=n == 4) for n, loss in enumerate([0.3, 0.4, 0.35, 2.0, 0.95])]
    assert clusters.spawners(drifted) == [3, 4]  # a credited drift report halves the margin
    liar = [*replies[:3], ClusterReply(9, 0, 10.0, 1e6, None)]  # a huge loss, but no losses that add up
    assert clusters.spawners(liar) == []


def test_when_every_model_slot_is_taken_the_model_no_node_trains_makes_room():
    clusters = _clusters({0: 0.0, 1: 1.0}, max_clusters=2)
    clusters.node_cluster = {10: 0, 11: 0, 12: 0}  # no node trains model 1 any more
    replies = [_reply(n, loss) for n, loss in zip((10, 11, 12), [0.3, 0.4, 5.0])]
    assert clusters.spawners(replies) == [2]
    clusters.finish_round(4, replies, {0: _record(0.5)}, {2: _record(9.0)})
    assert sorted(clusters.models) == [0, 2] and clusters.home(12) == 2
    busy = _clusters({0: 0.0, 1: 1.0}, max_clusters=2)
    busy.node_cluster = {10: 0, 11: 0, 12: 1, 13: 0}
    assert busy.spawners([_reply(n, loss) for n, loss in zip((10, 11, 13), [0.3, 0.4, 5.0])]) == []


def test_a_spawned_model_is_the_replys_update_and_its_node_trains_it_next():
    clusters = _clusters({0: 0.0})
    replies = [_reply(n, loss) for n, loss in enumerate([0.3, 0.4, 5.0])]
    clusters.finish_round(1, replies, {0: _record(0.5)}, {2: _record(9.0)})
    assert sorted(clusters.models) == [0, 1]
    assert clusters.models[1]["w"].numpy().tolist() == [9.0] * 3
    assert clusters.home(2) == 1 and clusters.home(0) == 0
    assert clusters.summary()["cluster_spawns"] == 1


def test_two_models_that_fit_the_same_clients_merge_weighted_by_their_replies():
    clusters = _clusters({0: 0.0, 1: 3.0, 2: 100.0})
    replies = [
        ClusterReply(0, 0, 10.0, 0.30, {0: 0.30, 1: 0.5, 2: 6.0}),
        ClusterReply(1, 0, 10.0, 0.35, {0: 0.35, 1: 0.6, 2: 5.0}),
        ClusterReply(2, 1, 20.0, 0.40, {0: 0.45, 1: 0.40, 2: 7.0}),
        ClusterReply(3, 2, 10.0, 0.20, {0: 6.0, 1: 6.5, 2: 0.20}),  # another concept: no merge
    ]
    clusters.finish_round(1, replies, {}, {})
    assert sorted(clusters.models) == [0, 2]
    assert clusters.models[0]["w"].numpy() == pytest.approx([1.5] * 3)  # 0 and 3 weighted 20 : 20
    assert clusters.home(2) == 0
    assert clusters.summary()["cluster_merges"] == 1


def test_a_model_no_client_chose_merges_away_only_when_it_fits_another_models_clients():
    kept_for_later = _clusters({0: 0.0, 1: 5.0})  # 1: a concept no one holds now
    replies = [ClusterReply(n, 0, 10.0, 0.3, {0: 0.3, 1: 4.0}) for n in range(3)]
    kept_for_later.finish_round(1, replies, {}, {})
    assert sorted(kept_for_later.models) == [0, 1]
    duplicate = _clusters({0: 0.0, 1: 0.1})
    replies = [ClusterReply(n, 0, 10.0, 0.3, {0: 0.3, 1: 0.35}) for n in range(3)]
    duplicate.finish_round(1, replies, {}, {})
    assert sorted(duplicate.models) == [0]
    assert duplicate.models[0]["w"].numpy().tolist() == [0.0] * 3  # the unchosen one adds nothing


def test_a_model_whose_nodes_were_not_asked_this_round_is_not_merged_on_others_word():
    clusters = _clusters({0: 0.0, 1: 5.0})
    clusters.node_cluster = {20: 0, 21: 0, 22: 0}  # model 0's nodes sit this round out
    replies = [ClusterReply(5, 1, 10.0, 0.3, {0: 0.35, 1: 0.3})]  # one reply says model 0 fits it as well
    clusters.finish_round(1, replies, {}, {})
    assert sorted(clusters.models) == [0, 1]
    assert clusters.models[0]["w"].numpy().tolist() == [0.0] * 3


def test_a_model_spawned_this_round_is_not_merged_back_into_the_one_it_left():
    clusters = _clusters({0: 0.0})
    replies = [ClusterReply(n, 0, 10.0, loss, {0: loss}) for n, loss in enumerate([0.3, 0.4, 0.35, 5.0])]
    spawners = clusters.spawners(replies)
    clusters.finish_round(1, replies, {0: _record(0.1)}, {i: _record(9.0) for i in spawners})
    assert sorted(clusters.models) == [0, 1]


def test_losses_that_do_not_add_up_are_not_used_to_merge():
    from server.clusters import cluster_reply

    honest = cluster_reply(1, 0, 10.0, {"cluster-loss": 0.3, "cluster-losses": [0.3, 0.4]}, False, [0, 2])
    assert honest.losses == {0: 0.3, 2: 0.4}
    wrong_length = cluster_reply(1, 0, 10.0, {"cluster-loss": 0.3, "cluster-losses": [0.3]}, False, [0, 2])
    not_the_best = cluster_reply(1, 0, 10.0, {"cluster-loss": 0.9, "cluster-losses": [0.3, 0.4]}, False, [0, 2])
    assert wrong_length.losses is None and not_the_best.losses is None


@pytest.mark.parametrize("value", [7, -1, 1.5, math.nan, math.inf, True, "0", [0], 10**30])
def test_a_reply_naming_no_model_of_the_round_is_dropped_with_the_reason(value):
    clusters = _clusters({0: 0.0, 2: 1.0})
    content = RecordDict({"metrics": MetricRecord({"num-examples": 3})})
    try:
        content["metrics"]["cluster"] = value
    except Exception:  # Flower refuses the value itself: nothing can reach the server
        return
    cluster, reason = clusters.claimed(content, node=5)
    assert cluster is None and "not one of this round's models [0, 2]" in reason


def test_a_reply_that_names_no_model_counts_for_the_model_it_was_sent(run_identity):
    clusters = _clusters({0: 0.0, 2: 1.0})
    clusters.node_cluster = {5: 2}
    content = RecordDict({"metrics": MetricRecord({"num-examples": 3})})
    assert clusters.claimed(content, node=5) == (2, None)  # a plain Flower client
    message = Message(content=RecordDict({"arrays": _record(0.0), "config": ConfigRecord({})}),
                      message_type="train", dst_node_id=5)
    sent = clusters.configure([message])[0].content
    assert sent["arrays"] is clusters.models[2]
    assert {k for k in sent.array_records if k.startswith(CANDIDATE_PREFIX)} == {"model-0", "model-2"}
    assert sent["config"][CHOICE_RULE_KEY] == "loss"


@pytest.fixture
def run_identity():
    """Flower's messages need a run, as on a real ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def test_the_personal_head_reference_sends_and_serves_each_node_its_own_head(run_identity):
    hook = PersonalHead()
    global_model = ArrayRecord({"features.1.weight": Array(np.zeros(2, np.float32)),
                                "head.weight": Array(np.zeros(2, np.float32))})
    own = ArrayRecord({"features.1.weight": Array(np.ones(2, np.float32)),
                       "head.weight": Array(np.full(2, 7.0, np.float32))})
    sent = Message(content=RecordDict({}), message_type="train", dst_node_id=3)
    reply = Message(content=RecordDict({"arrays": own}), reply_to=sent)  # node 3 answers
    hook.after_aggregate(1, [reply])
    served = hook.served_models(global_model, [3, 4])
    assert served[3]["head.weight"].numpy().tolist() == [7.0, 7.0]
    assert served[3]["features.1.weight"].numpy().tolist() == [0.0, 0.0]  # the body stays the global one
    assert served[4] is global_model  # a node that never replied gets the global model


# ---- whole runs -------------------------------------------------------------
def test_clustered_training_serves_clients_on_different_concepts_as_well_as_the_oracle(tmp_path):
    # 6 clients go from concept 0 to concept 1 and back, each at its own rounds
    common = dict(scenario="distributed-drift", num_tasks=2, clients=6, rounds_per_task=4, async_spread=4,
                  concept_switches=2, concept_recur=1.0, local_epochs=5, method="naive", hidden="64",
                  cluster_margin=2.0, quiet=True)
    runs = {training: run_inprocess(RunConfig.of(**common, training=training, out=str(tmp_path / training)))
            for training in ("federated", "clustered", "cluster-oracle")}
    single, clustered, oracle = runs["federated"], runs["clustered"], runs["cluster-oracle"]
    assert clustered["clusters"] == 2 and clustered["cluster_spawns"] >= 1
    assert clustered["served_acc"] > single["served_acc"] + 0.05
    assert clustered["served_acc"] > oracle["served_acc"] - 0.03
    assert "clusters" not in single
