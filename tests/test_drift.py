"""Clients notice drift in their prequential error stream, and remember across restarts."""

import json

import pytest
import torch

from client.drift import DriftMonitor
from common.files import load_tensors, save_tensors_atomic
from fedtide.cli import main


def _stream(before: float, after: float, n: int = 1000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rates = torch.tensor([before] * n + [after] * n)
    return (torch.rand(2 * n, generator=g) < rates).to(torch.uint8)


def test_adwin_fires_soon_after_an_abrupt_change():
    detected = DriftMonitor("adwin").update(_stream(0.1, 0.8))
    assert detected and 1000 <= detected[0] <= 1100


def test_detectors_stay_quiet_on_a_stationary_stream():
    for name in ("adwin", "page-hinkley"):
        assert DriftMonitor(name).update(_stream(0.2, 0.2)) == []


def test_detector_state_round_trips_through_disk(tmp_path):
    stream = _stream(0.1, 0.8)
    uninterrupted = DriftMonitor("adwin")
    uninterrupted.update(stream[:900])
    expected = uninterrupted.update(stream[900:])

    before_restart = DriftMonitor("adwin")
    before_restart.update(stream[:900])
    save_tensors_atomic(tmp_path / "drift.safetensors", before_restart.state())
    after_restart = DriftMonitor("adwin")
    after_restart.load_state(load_tensors(tmp_path / "drift.safetensors"))
    assert after_restart.update(stream[900:]) == expected


def test_task_switches_are_reported_in_the_run_folder(tmp_path):
    out = tmp_path / "run"
    flags = ["--method", "naive", "--rounds-per-task", "2", "--local-epochs", "1", "--iid", "--quiet"]
    assert main(["simulate", "--out", str(out), *flags]) == 0
    events = [json.loads(line) for line in (out / "drift_events.jsonl").read_text().splitlines()]
    switch_rounds = {3, 5, 7, 9}  # first round of tasks 2..5
    assert any(e["round"] in switch_rounds for e in events)
    assert json.loads((out / "summary.json").read_text())["drift_events"] == len(events)


def test_reactions_follow_detected_drift(tmp_path):
    out = tmp_path / "run"
    flags = ["--method", "replay", "--rounds-per-task", "3", "--local-epochs", "1", "--async-spread", "2",
             "--react-server", "--drift-quorum", "0.4", "--react-lr-boost", "2", "--fraction-train", "0.6",
             "--lr", "0.05", "--quiet"]
    assert main(["simulate", "--out", str(out), *flags]) == 0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((out / "summary.json").read_text())["boosted_rounds"]
    credited_before: set[int] = set()  # nodes whose last reply reported drift and was credited
    detected_before: set[int] = set()  # nodes whose own detector fired in their last reply
    since_report: dict[int, int] = {}  # node -> its replies since its last credited report
    quorum_rounds = 0
    for previous, current in zip(rounds, rounds[1:]):
        share = sum(c.get("drift-credited", 0) * c["drift-detected"] for c in previous["clients"]) / len(previous["clients"])
        if share >= 0.4:
            quorum_rounds += 1
            assert len(current["clients"]) == 5  # a drift quorum makes the server sample everyone
    for r in rounds:
        for c in r["clients"]:
            assert c["local-epochs"] == (2 if c["node"] in credited_before else 1)  # the server's epoch boost
            assert c["lr"] == pytest.approx(0.1 if c["node"] in detected_before else 0.05)  # the client's own lr boost
            credited_before.discard(c["node"])
            detected_before.discard(c["node"])
            if c.get("drift-credited") and c["drift-detected"]:  # the rounds that follow one do not count here
                credited_before.add(c["node"])
            if c["drift-detected"]:
                detected_before.add(c["node"])
            if c.get("drift-credited") and c["drift-detected"]:
                since_report[c["node"]] = 0
            elif c.get("drift-credited"):  # a credited report is followed for at most 3 more replies
                since_report[c["node"]] += 1
                assert since_report[c["node"]] <= 3
    assert quorum_rounds > 0


def test_same_round_reactions_train_drifting_clients_longer(tmp_path):
    out = tmp_path / "run"
    flags = ["--method", "replay", "--rounds-per-task", "3", "--local-epochs", "1", "--async-spread", "2",
             "--react-extra-epochs", "2", "--drift-weight", "3", "--lr", "0.05", "--quiet"]
    assert main(["simulate", "--out", str(out), *flags]) == 0
    replies = [c for line in (out / "metrics.jsonl").read_text().splitlines() for c in json.loads(line)["clients"]]
    assert any(c["drift-detected"] for c in replies) and not all(c["drift-detected"] for c in replies)
    since_detection: dict[int, int] = {}  # node -> its replies since its last detection
    for c in replies:  # the extra epochs come in the very round a client detects drift, and follow it a few rounds
        if c["drift-detected"]:
            assert c["local-epochs"] == 3
            since_detection[c["node"]] = 0
            continue
        since = since_detection.get(c["node"])
        since_detection[c["node"]] = None if since is None else since + 1
        if c["local-epochs"] == 3:  # still recovering: at most --drift-follow-rounds (3) after its detection
            assert since is not None and since + 1 <= 3
        else:
            assert c["local-epochs"] == 1


def test_a_reply_reporting_drift_weighs_more_in_that_rounds_aggregate():
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from common.config import RunConfig
    from common.schedule import TaskSchedule
    from server.history import RunHistory
    from server.strategy import run_strategy

    def reply(value: float, drifted) -> RecordDict:  # as the strategy passes it on: with the server's credit
        return RecordDict({"arrays": ArrayRecord({"w": torch.full((2,), value)}),
                           "metrics": MetricRecord({"num-examples": 10, "drift-detected": drifted,
                                                    "drift-credited": drifted})})

    config = RunConfig.of(drift_weight=3.0)
    def weights(strategy, replies):
        out = [10.0] * len(replies)
        for hook in strategy.hooks:
            out = hook.weights(replies, out)
        return out

    strategy = run_strategy(config, RunHistory(TaskSchedule.build(5, 2, 2, 0, 0)))
    assert weights(strategy, [reply(1.0, 0), reply(5.0, 1), reply(2.0, [1, 1])]) == [10.0, 30.0, 10.0]  # a malformed flag gains nothing
    assert weights(run_strategy(RunConfig(), RunHistory(TaskSchedule.build(5, 2, 2, 0, 0))),
                   [reply(1.0, 0), reply(5.0, 1)]) == [10.0, 10.0]


def test_same_round_reactions_need_a_detector():
    from common.config import RunConfig
    from common.errors import FedtideError

    for settings in (dict(react_extra_epochs=1), dict(drift_weight=2.0)):
        with pytest.raises(FedtideError, match="need a detector"):
            RunConfig.of(drift_detector="none", **settings)
    for weight in (0, float("inf")):
        with pytest.raises(FedtideError, match="--drift-weight must be (> 0|a finite number)"):
            RunConfig.of(drift_weight=weight)
    with pytest.raises(FedtideError, match="ignores reply weights"):
        RunConfig.of(drift_weight=3.0, aggregation="median")
    with pytest.raises(FedtideError, match="aggregates nothing"):
        RunConfig.of(drift_weight=3.0, training="local-only")


def test_a_drift_flag_other_than_0_or_1_rejects_the_reply():
    from flwr.app import MetricRecord

    from server.validation import check_metrics

    assert check_metrics(MetricRecord({"num-examples": 10, "drift-detected": 1}), 100) is None
    assert "must be 0 or 1" in check_metrics(MetricRecord({"num-examples": 10, "drift-detected": 2}), 100)
    assert "must be a number" in check_metrics(MetricRecord({"num-examples": 10, "drift-detected": [1]}), 100)


def test_the_drift_benchmark_runs_its_variants_in_a_tiny_configuration():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "benchmarks/drift.py", "--preset", "split-digits", "--spread", "1", "--json",
         "--set", "rounds_per_task=2", "--set", "local_epochs=1", "--variants", "none,weight-now"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert [m["variant"] for m in report["means"]] == ["none", "weight-now"]
    assert all(r["switches"] > 0 and 0 <= r["acc"] <= 1 for r in report["rows"])
    bad = subprocess.run([sys.executable, "benchmarks/drift.py", "--preset", "split-digits", "--variants", "nope"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown variant" in bad.stderr


def test_the_drift_benchmark_measures_a_liar_in_a_tiny_configuration():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "benchmarks/drift.py", "--preset", "split-digits", "--spread", "1", "--json", "--liars",
         "--set", "rounds_per_task=2", "--set", "local_epochs=1", "--variants", "weight-now"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["run"]: r for r in json.loads(result.stdout)["rows"]}
    word = rows["drift-liar, --drift-evidence 0 (the client's word)"]
    checked = rows["drift-liar (reports drift every round)"]
    assert word["liar_credited"] > checked["liar_credited"]  # every report acted on, against a few
    assert word["liar_share"] > word["honest_mean"] and checked["liar_share"] < word["liar_share"]


def test_the_detector_benchmark_scores_river_detectors_on_synthetic_streams():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "benchmarks/drift_detectors.py", "--synthetic-only", "--json"],
                            cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)["synthetic"]
    adwin = next(r for r in rows if r["stream"] == "abrupt" and r["detector"] == "adwin d=0.01")
    assert adwin["recall"] == 1.0 and adwin["false_alarms_per_stream"] == 0 and adwin["mean_delay_samples"] < 100
    bad = subprocess.run([sys.executable, "benchmarks/drift_detectors.py", "--scenarios", "nope"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown scenario" in bad.stderr
