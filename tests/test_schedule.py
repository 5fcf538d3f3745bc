"""Asynchronous drift and the figures computed from a drifting stream."""

from common.config import RunConfig
from common.schedule import TaskSchedule
from common.scenarios import build_scenario
from common.stream_metrics import rounds_to_recover, score_detections


def test_synchronous_schedule_moves_everyone_together():
    s = TaskSchedule.build(num_tasks=3, rounds_per_task=2, clients=4, spread=0, seed=0)
    assert s.num_rounds == 6
    assert [s.task_of(c, 3) for c in range(4)] == [1, 1, 1, 1]
    assert s.end_round(0) == 2 and s.start_round(1) == 3


def test_async_schedule_spreads_switches_and_gives_every_task_its_rounds():
    s = TaskSchedule.build(num_tasks=4, rounds_per_task=3, clients=20, spread=3, seed=1)
    assert s.num_rounds == 15
    assert len(set(s.offsets)) > 1 and max(s.offsets) <= 3
    mixed = [r for r in range(1, s.num_rounds + 1) if len({s.task_of(c, r) for c in range(20)}) > 1]
    assert mixed  # some rounds hold clients on different tasks
    for c in range(20):
        tasks = [s.task_of(c, r) for r in range(1, s.num_rounds + 1)]
        assert tasks == sorted(tasks)
        assert all(tasks.count(t) >= 3 for t in range(4))
        assert s.task_of(c, s.switch_round(c, 2)) == 2 and s.task_of(c, s.switch_round(c, 2) - 1) == 1


def test_scenario_uses_the_async_schedule():
    scenario = build_scenario(*_scenario_args(RunConfig.of(async_spread=2, rounds_per_task=2)))
    assert RunConfig.of(async_spread=2, rounds_per_task=2).num_rounds == scenario.schedule.num_rounds


def test_rounds_to_recover_counts_rounds_until_near_the_best():
    curve = [0.1, 0.9, 0.9, 0.0, 0.5, 0.85, 0.95, 0.96]  # task starts in round 3
    assert rounds_to_recover(curve, start=3, end=7) == 4  # round 6 is the first >= 0.9 * 0.96
    assert rounds_to_recover([0.0, 0.0], start=1, end=1) == 1


def test_detections_are_matched_to_switches_within_one_round():
    timelines = {
        1: [(1, 0, False, 0), (2, 1, True, 0), (3, 1, False, 0), (4, 2, False, 0), (5, 2, True, 0)],  # 2 switches: 0 and 1 late
        2: [(1, 0, True, 0), (2, 1, False, 0), (3, 1, False, 0), (4, 2, False, 0), (5, 2, False, 0)],  # a false alarm, 2 misses
    }
    score = score_detections(timelines)
    assert score["switches"] == 4 and score["detected"] == 2
    assert score["detection_rate"] == 0.5 and score["mean_delay_rounds"] == 0.5
    assert score["false_alarms"] == 1


def test_client_recovery_counts_replies_until_prequential_accuracy_is_back():
    from common.stream_metrics import client_recovery_rounds

    timelines = {
        1: [(1, 0, False, 0.9), (2, 1, True, 0.1), (3, 1, False, 0.5), (4, 1, False, 0.85)],  # back in 3
        2: [(1, 0, False, 0.8), (2, 1, True, 0.75)],  # 0.75 >= 0.72: back at once
    }
    assert client_recovery_rounds(timelines) == 2.0
    assert client_recovery_rounds({1: [(1, 0, False, 0.9)]}) is None


def _scenario_args(config):
    return config.data, config.seed
