"""Tests for cir_cli.metrics; expected values are worked out by hand in the comments."""

from __future__ import annotations

import pytest
import torch

from cir_cli import metrics


def _t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def test_constants() -> None:
    assert metrics.FASHIONIQ_KS == (10, 50)
    assert metrics.CIRR_KS == (1, 5, 10, 50)
    assert metrics.CIRR_SUBSET_KS == (1, 2, 3)


def test_recall_at_k_hand_worked() -> None:
    ranked = _t([[3, 1, 2, 0], [0, 2, 1, 3], [1, 0, 3, 2], [2, 3, 0, 1]])
    targets = _t([3, 1, 0, 1])
    # target positions: 0, 2, 1, 3 -> @1: 1/4, @2: 2/4, @3: 3/4, @4: 4/4
    assert metrics.recall_at_k(ranked, targets, [1, 2, 3, 4]) == {
        1: 25.0,
        2: 50.0,
        3: 75.0,
        4: 100.0,
    }


def test_recall_k_larger_than_list_uses_whole_list() -> None:
    ranked = _t([[2, 0], [1, 0]])
    targets = _t([0, 2])
    # query 0 finds its target at position 1; query 1's target is not in its list at all.
    assert metrics.recall_at_k(ranked, targets, [1, 10, 50]) == {1: 0.0, 10: 50.0, 50: 50.0}


def test_recall_target_missing_is_miss() -> None:
    ranked = _t([[4, 5, -1]])
    # The target is absent (and -1 padding must not match anything).
    assert metrics.recall_at_k(ranked, _t([7]), [1, 3, 100]) == {1: 0.0, 3: 0.0, 100: 0.0}


def test_recall_single_query() -> None:
    assert metrics.recall_at_k(_t([[9, 4]]), _t([4]), [1, 2]) == {1: 0.0, 2: 100.0}


def test_recall_zero_queries_raises() -> None:
    with pytest.raises(ValueError):
        metrics.recall_at_k(torch.empty((0, 5), dtype=torch.long), _t([]), [1])
    with pytest.raises(ValueError):
        metrics.recall_from_ranks(_t([]), [1])


def test_recall_bad_inputs_raise() -> None:
    with pytest.raises(ValueError):
        metrics.recall_at_k(_t([[0, 1]]), _t([0]), [0])
    with pytest.raises(ValueError):
        metrics.recall_at_k(_t([[0, 1]]), _t([0, 1]), [1])
    with pytest.raises(ValueError):
        metrics.recall_at_k(_t([[0, -1]]), _t([-1]), [1])


def test_recall_from_ranks_hand_worked() -> None:
    ranks = _t([0, 4, 9, 10, 49, 50, 1, 2])
    # <1: {0} = 1/8; <5: {0,4,1,2} = 4/8; <10: + {9} = 5/8; <50: + {10,49} = 7/8
    assert metrics.recall_from_ranks(ranks, [1, 5, 10, 50]) == {
        1: 12.5,
        5: 50.0,
        10: 62.5,
        50: 87.5,
    }


def test_subset_recall_two_queries() -> None:
    ranked = _t([[5, 2, 7, 1, 3, 0], [4, 0, 6, 2, -1, -1]])
    targets = _t([3, 6])
    groups = _t([[1, 3, 7, -1], [2, 6, 0, -1]])
    # query 0 filtered: [7, 1, 3] -> target at 2; query 1 filtered: [0, 6, 2] -> target at 1
    assert metrics.subset_recall_at_k(ranked, targets, groups, [1, 2, 3]) == {
        1: 0.0,
        2: 50.0,
        3: 100.0,
    }


def test_subset_recall_target_outside_group_is_miss() -> None:
    ranked = _t([[3, 1, 2]])
    # The target 3 is ranked first but is not in the group, so it is filtered out.
    assert metrics.subset_recall_at_k(ranked, _t([3]), _t([[1, 2]]), [1, 2, 3]) == {
        1: 0.0,
        2: 0.0,
        3: 0.0,
    }


def test_fashioniq_summary_hand_worked() -> None:
    per_category = {
        "dress": {10: 30.0, 50: 60.0},
        "shirt": {10: 20.0, 50: 40.0},
        "toptee": {10: 40.0, 50: 70.0},
    }
    out = metrics.fashioniq_summary(per_category)
    # avg@10 = 90/3 = 30; avg@50 = 170/3; average = (30 + 170/3) / 2 = 130/3
    assert out["dress_recall_at10"] == 30.0
    assert out["shirt_recall_at50"] == 40.0
    assert out["toptee_recall_at10"] == 40.0
    assert out["average_recall_at10"] == pytest.approx(30.0)
    assert out["average_recall_at50"] == pytest.approx(56.666666666666664)
    assert out["average_recall"] == pytest.approx(43.333333333333336)
    assert list(out)[-3:] == ["average_recall_at10", "average_recall_at50", "average_recall"]
    assert len(out) == 9


def test_fashioniq_summary_missing_k_raises() -> None:
    with pytest.raises(ValueError):
        metrics.fashioniq_summary({"dress": {10: 1.0}})
    with pytest.raises(ValueError):
        metrics.fashioniq_summary({})


def test_cirr_summary_hand_worked() -> None:
    recall = {1: 4.0, 5: 8.0, 10: 16.0, 50: 32.0}
    subset = {1: 16.0, 2: 32.0, 3: 32.0}
    out = metrics.cirr_summary(recall, subset)
    assert out["recall_at1"] == 4.0
    assert out["recall_at50"] == 32.0
    assert out["group_recall_at3"] == 32.0
    # (8 + 16) / 2
    assert out["mean_r5_rs1"] == 12.0
    # (4 + 8 + 16 + 32 + 16 + 32 + 32) / 7 = 140 / 7
    assert out["arithmetic_mean"] == pytest.approx(20.0)
    # 7 / (1/4 + 1/8 + 1/16 + 1/32 + 1/16 + 1/32 + 1/32) = 7 / (19/32) = 224/19
    assert out["harmonic_mean"] == pytest.approx(11.789473684210526)
    # product = 2^(2+3+4+5+4+5+5) = 2^28 -> 7th root = 2^4
    assert out["geometric_mean"] == pytest.approx(16.0)
    assert set(out) == {
        "recall_at1",
        "recall_at5",
        "recall_at10",
        "recall_at50",
        "group_recall_at1",
        "group_recall_at2",
        "group_recall_at3",
        "mean_r5_rs1",
        "arithmetic_mean",
        "harmonic_mean",
        "geometric_mean",
    }


def test_cirr_summary_zero_value() -> None:
    out = metrics.cirr_summary({1: 0.0, 5: 10.0, 10: 20.0, 50: 30.0}, {1: 10.0, 2: 20.0, 3: 30.0})
    assert out["harmonic_mean"] == 0.0
    assert out["geometric_mean"] == 0.0
    # 120 / 7
    assert out["arithmetic_mean"] == pytest.approx(17.142857142857142)


def test_cirr_summary_missing_k_raises() -> None:
    with pytest.raises(ValueError):
        metrics.cirr_summary({1: 1.0, 5: 1.0, 10: 1.0}, {1: 1.0, 2: 1.0, 3: 1.0})
