import pytest

from common.metrics import (
    average_accuracy, backward_transfer, forgetting_per_task, forward_transfer, summarize,
)

# after task 0: 0.9 on task 0; after task 1: 0.6 / 0.8; after task 2: 0.5 / 0.7 / 0.9
R = [
    [0.9, 0.2, 0.1],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 0.9],
]
BASELINE = [0.1, 0.1, 0.1]


def test_average_accuracy_is_mean_of_last_row():
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)


def test_backward_transfer_compares_final_with_just_learned():
    assert backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)


def test_forward_transfer_compares_before_training_with_baseline():
    assert forward_transfer(R, BASELINE) == pytest.approx(((0.2 - 0.1) + (0.3 - 0.1)) / 2)


def test_forgetting_is_best_earlier_minus_final():
    assert forgetting_per_task(R) == pytest.approx([0.9 - 0.5, 0.8 - 0.7])


def test_single_task_has_no_transfer_or_forgetting():
    summary = summarize([[0.7]], [0.1])
    assert summary["acc"] == pytest.approx(0.7)
    assert summary["bwt"] == summary["fwt"] == summary["forgetting"] == 0.0


def test_non_square_matrix_is_refused():
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2]])
