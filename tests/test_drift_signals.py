"""Round-level drift tests, more River detectors, and the server's check of drift reports."""

import pytest
import torch
from torch import nn

from client.drift import DETECTORS, DriftMonitor
from client.drift_signals import (
    RoundEvidence,
    gather_evidence,
    gather_evidence_many,
    input_shift_ratio,
    round_drift,
)
from client.rounds import DRIFT_PREFIX, check_drift
from common.datasets import LabelledSplit
from common.files import load_tensors, save_tensors_atomic
from common.sections import DriftSettings
from server.drift_credit import DriftCredit


def _images(n: int, mean: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (mean + 0.1 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1)


class _Threshold(nn.Module):
    """Predicts class 1 when the image's mean is above 0.5: a fixed, known model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x.reshape(len(x), -1).mean(dim=1) - 0.5) * 20
        return torch.stack([-score, score], dim=1)


def _evidence(mean: float, label: int, seed: int, n: int = 200) -> RoundEvidence:
    data = LabelledSplit(_images(n, mean, seed), torch.full((n,), label))
    evidence = gather_evidence(_Threshold(), data, torch.device("cpu"))
    assert evidence is not None
    return evidence


def test_the_accuracy_test_fires_when_the_received_model_fails_on_new_data_and_not_otherwise():
    known = _evidence(0.8, 1, seed=0)
    assert known.accuracy == 1.0 and known.samples == 200
    assert not round_drift("accuracy-drop", known, _evidence(0.8, 1, seed=1), margin=0.1)
    relabelled = _evidence(0.8, 0, seed=2)  # same inputs, another meaning: only labels show it
    assert round_drift("accuracy-drop", known, relabelled, margin=0.1)
    assert not round_drift("input-shift", known, relabelled, margin=0.1)
    moved = _evidence(0.2, 0, seed=3)  # new inputs the model still gets right
    assert round_drift("input-shift", known, moved, margin=0.1)
    assert not round_drift("accuracy-drop", known, moved, margin=0.1)
    assert not round_drift("accuracy-drop", None, relabelled, margin=0.1)  # a first round has nothing to compare


def test_a_small_fall_on_few_samples_is_not_drift():
    before = RoundEvidence(8, 1.0, 0.9, torch.zeros(3), 0.1)
    now = RoundEvidence(8, 0.75, 0.9, torch.zeros(3), 0.1)  # 2 of 8 wrong: a 0.25 fall, but 8 samples
    assert not round_drift("accuracy-drop", before, now, margin=0.1)
    assert round_drift("accuracy-drop", RoundEvidence(256, 1.0, 0.9, torch.zeros(3), 0.1),
                       RoundEvidence(256, 0.75, 0.9, torch.zeros(3), 0.1), margin=0.1)
    assert round_drift("confidence-drop", before, RoundEvidence(8, 1.0, 0.7, torch.zeros(3), 0.1), margin=0.15)
    with pytest.raises(ValueError):
        round_drift("adwin", before, now, margin=0.1)


def test_the_input_shift_ratio_is_about_one_for_one_distribution():
    ratios = [input_shift_ratio(_evidence(0.5, 1, seed=s), _evidence(0.5, 1, seed=s + 100)) for s in range(20)]
    assert 0.3 < sum(ratios) / len(ratios) < 3
    assert input_shift_ratio(_evidence(0.5, 1, seed=0), _evidence(0.6, 1, seed=1)) > 50


def test_evidence_of_several_clients_in_one_pass_equals_one_by_one():
    splits = [LabelledSplit(_images(n, m, s), torch.full((n,), 1)) for n, m, s in ((300, 0.8, 0), (5, 0.3, 1), (0, 0.5, 2))]
    together = gather_evidence_many(_Threshold(), splits, torch.device("cpu"))
    alone = [gather_evidence(_Threshold(), split, torch.device("cpu")) for split in splits]
    assert together[2] is None and alone[2] is None
    for a, b in zip(together[:2], alone[:2]):
        assert (a.samples, a.accuracy) == (b.samples, b.accuracy)
        assert a.confidence == pytest.approx(b.confidence) and torch.allclose(a.input_mean, b.input_mean)
    assert together[0].samples == 256  # the first 256 new samples are enough


def test_a_round_level_detector_keeps_its_evidence_on_disk_and_ignores_a_bad_one(tmp_path):
    settings = DriftSettings(drift_detector="accuracy-drop")
    first = check_drift(settings, {}, torch.zeros(0), _evidence(0.8, 1, seed=0))
    assert first.positions == [] and set(first.state) == {DRIFT_PREFIX + "evidence", DRIFT_PREFIX + "input-mean"}
    save_tensors_atomic(tmp_path / "state.safetensors", first.state)
    restored = load_tensors(tmp_path / "state.safetensors")
    assert check_drift(settings, restored, torch.zeros(0), _evidence(0.8, 0, seed=1)).positions == [0]
    # no new data: nothing is compared and the evidence waits for the next round
    assert check_drift(settings, restored, torch.zeros(0), None).state.keys() == restored.keys()
    damaged = {**restored, DRIFT_PREFIX + "evidence": torch.tensor([float("nan"), 1, 1, 1], dtype=torch.float64)}
    assert check_drift(settings, damaged, torch.zeros(0), _evidence(0.8, 0, seed=1)).positions == []
    resized = {**restored, DRIFT_PREFIX + "input-mean": torch.zeros(7)}
    assert check_drift(settings, resized, torch.zeros(0), _evidence(0.8, 0, seed=1)).positions == []
    # a River detector's state left from another detector is not read
    assert check_drift(DriftSettings(drift_detector="adwin"), restored, torch.zeros(5, dtype=torch.uint8)).positions == []


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_every_river_detector_finds_an_abrupt_rise_in_errors(name):
    g = torch.Generator().manual_seed(0)
    rates = torch.tensor([0.1] * 2000 + [0.6] * 2000)
    stream = (torch.rand(4000, generator=g) < rates).to(torch.uint8)
    assert any(2000 <= p < 2600 for p in DriftMonitor(name).update(stream))


def test_a_client_that_reports_drift_every_round_earns_no_reaction():
    credit = DriftCredit(evidence=0.1)
    for r in range(1, 21):  # its data never changes: its pre-training accuracy stays put
        judged = credit.judge(r, 7, {"num-examples": 10, "drift-detected": 1, "pre-acc": 0.9})
        assert judged["drift-credited"] == 0 and judged["drift-detected"] == 1
    assert credit.credits[7] == 0 and credit.denied == 20
    # a reply without the evidence earns nothing either
    assert credit.judge(21, 8, {"num-examples": 10, "drift-detected": 1})["drift-credited"] == 0


def test_a_real_change_is_credited_and_a_faker_gets_no_more_than_its_peers():
    credit = DriftCredit(evidence=0.1)
    honest = [0.9, 0.92, 0.3, 0.8, 0.9, 0.91, 0.35, 0.85, 0.9, 0.9]  # two real switches, in rounds 3 and 7
    faker_credits = []
    for r, accuracy in enumerate(honest, start=1):
        for node in (1, 2, 3):
            fell = r > 1 and honest[r - 2] - accuracy >= 0.1
            assert credit.judge(r, node, {"num-examples": 10, "drift-detected": int(fell), "pre-acc": accuracy}).get(
                "drift-credited", int(fell)) == int(fell)
        faked = credit.judge(r, 9, {"num-examples": 10, "drift-detected": 1, "pre-acc": 1.0 if r % 2 else 0.0})
        faker_credits.append(faked["drift-credited"])
    assert [credit.credits[n] for n in (1, 2, 3)] == [2, 2, 2]
    assert credit.credits[9] <= 3 == sum(faker_credits)  # a fake fall every other round, yet at most median + 1
    saved = credit.state()
    again = DriftCredit(evidence=0.1)
    again.load_state(saved)
    assert again.state() == saved and again.summary() == credit.summary()


def test_evidence_zero_takes_the_clients_word():
    credit = DriftCredit(evidence=0.0)
    assert all(credit.judge(r, 1, {"num-examples": 10, "drift-detected": 1})["drift-credited"] == 1 for r in range(5))


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf"), "0.5", [0.5]])
def test_a_pre_training_accuracy_out_of_range_drops_the_reply(value):
    from server.reply_metrics import ReplyMetrics

    assert ReplyMetrics(100).clean({"num-examples": 10, "pre-acc": value}).reason is not None
    assert ReplyMetrics(100).clean({"num-examples": 10, "pre-acc": 0.5}).reason is None


def test_a_credited_drift_keeps_its_reaction_until_the_node_has_recovered_for_a_few_rounds_at_most():
    credit = DriftCredit(evidence=0.1, follow_rounds=3)
    report = {"num-examples": 10, "drift-detected": 1}
    quiet = {"num-examples": 10, "drift-detected": 0}
    credit.judge(1, 1, {**quiet, "pre-acc": 0.95})
    assert credit.judge(2, 1, {**report, "pre-acc": 0.1})["drift-credited"] == 1
    assert credit.judge(3, 1, {**quiet, "pre-acc": 0.5})["drift-credited"] == 1  # still below 0.95
    assert credit.judge(4, 1, {**quiet, "pre-acc": 0.9})["drift-credited"] == 1
    assert "drift-credited" not in credit.judge(5, 1, {**quiet, "pre-acc": 0.96})  # back: over
    assert "drift-credited" not in credit.judge(6, 1, {**quiet, "pre-acc": 0.5})
    assert credit.credits[1] == 1  # the following rounds are not credits
    credit.judge(7, 2, {**quiet, "pre-acc": 0.95})
    credit.judge(8, 2, {**report, "pre-acc": 0.0})
    followed = [credit.judge(r, 2, {**quiet, "pre-acc": 0.0}).get("drift-credited", 0) for r in range(9, 15)]
    assert followed == [1, 1, 1, 0, 0, 0]  # never recovers: three rounds, then no more


def test_a_client_keeps_reacting_while_it_recovers_from_a_detected_drift():
    settings = DriftSettings(drift_detector="accuracy-drop", drift_follow_rounds=2)

    def evidence(accuracy: float) -> RoundEvidence:
        return RoundEvidence(256, accuracy, 0.9, torch.zeros(3), 0.1)

    state: dict = {}
    seen = []
    for accuracy in (0.95, 0.1, 0.4, 0.6, 0.6, 0.6):
        check = check_drift(settings, state, torch.zeros(0), evidence(accuracy))
        seen.append((bool(check.positions), check.recovering))
        state = check.state
    # detected at 0.1; follows at 0.4 and 0.6 (still more than 0.2 below 0.95), then stops: two rounds at most
    assert seen == [(False, False), (True, False), (False, True), (False, True), (False, False), (False, False)]
    check = check_drift(DriftSettings(drift_detector="accuracy-drop", drift_follow_rounds=0), {}, torch.zeros(0),
                        evidence(0.95))
    assert not check_drift(DriftSettings(drift_detector="accuracy-drop", drift_follow_rounds=0), check.state,
                           torch.zeros(0), evidence(0.1)).recovering


def test_a_late_switcher_whose_accuracy_did_not_fall_is_credited_within_a_wave_of_real_falls():
    credit = DriftCredit(evidence=0.1)
    quiet, report = {"num-examples": 10, "drift-detected": 0}, {"num-examples": 10, "drift-detected": 1}
    for node in (1, 2, 3):
        credit.judge(1, node, {**quiet, "pre-acc": 0.95})
    assert credit.judge(2, 1, {**report, "pre-acc": 0.05})["drift-credited"] == 1  # a real fall
    # node 2 switches two rounds later: the global model learned the new data meanwhile
    assert credit.judge(4, 2, {**report, "pre-acc": 0.93})["drift-credited"] == 1
    # node 3 reports four rounds after the last fall: no wave vouches for it
    assert credit.judge(6, 3, {**report, "pre-acc": 0.94})["drift-credited"] == 0



def test_a_round_of_one_sample_is_no_input_shift():
    one = _evidence(0.8, 1, seed=0, n=1)
    assert one.input_var == 0.0
    assert not round_drift("input-shift", _evidence(0.8, 1, seed=1), one, margin=0.1)
    assert not round_drift("input-shift", one, _evidence(0.2, 1, seed=2), margin=0.1)


def test_a_refused_report_keeps_following_and_a_node_cannot_vouch_for_itself_or_credit_itself():
    credit = DriftCredit(evidence=0.1, follow_rounds=3)
    quiet, report = {"num-examples": 10, "drift-detected": 0}, {"num-examples": 10, "drift-detected": 1}
    credit.judge(1, 1, {**quiet, "pre-acc": 0.95})
    credit.judge(1, 2, {**quiet, "pre-acc": 0.95})
    assert credit.judge(2, 1, {**report, "pre-acc": 0.1})["drift-credited"] == 1
    # reported again while recovering: over the median (node 2 has none), refused, but still followed
    assert credit.judge(3, 1, {**report, "pre-acc": 0.3})["drift-credited"] == 1 and credit.credits[1] == 1
    # its own fall in round 2 does not vouch for its next report without a fall
    credit.recovering.clear()
    assert credit.judge(4, 1, {**report, "pre-acc": 0.3})["drift-credited"] == 0
    # a client cannot award itself the credit
    assert "drift-credited" not in credit.judge(5, 2, {**quiet, "pre-acc": 0.95, "drift-credited": 1})


def test_weight_shares_are_recorded_only_where_the_rule_weighs_every_reply():
    from server.robust import AggregationRule

    assert AggregationRule("fedavg").weighs_replies and AggregationRule("clip", clip_norm=1.0).weighs_replies
    assert not any(AggregationRule(name).weighs_replies for name in ("median", "trimmed-mean", "multikrum"))


def test_a_follow_state_from_disk_never_outlasts_the_setting():
    settings = DriftSettings(drift_detector="accuracy-drop", drift_follow_rounds=2)
    low = RoundEvidence(256, 0.1, 0.9, torch.zeros(3), 0.1)
    state = {**low.as_state(), "follow": torch.tensor([0.95, 1e12], dtype=torch.float64)}  # tampered: 10^12 rounds
    state = {DRIFT_PREFIX + k: v for k, v in state.items()}
    followed = []
    for _ in range(4):
        check = check_drift(settings, state, torch.zeros(0), low)
        followed.append(check.recovering)
        state = check.state
    assert followed == [True, True, False, False]
