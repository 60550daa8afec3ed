"""GLUE metrics against hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest

from mtp.metrics import compute_metrics, task_score


def test_accuracy_and_f1() -> None:
    preds, gold = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    m = compute_metrics("f1_accuracy", preds, gold)
    # tp=2 fp=1 fn=1: F1 = 2*2/(2*2+1+1) = 2/3; accuracy 3/5
    assert m["f1"] == pytest.approx(200 / 3) and m["accuracy"] == pytest.approx(60.0)
    assert m["score"] == pytest.approx((200 / 3 + 60) / 2)


def test_matthews_by_hand() -> None:
    preds, gold = np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 0, 1, 1])
    tp, tn, fp, fn = 2, 2, 1, 1
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics("matthews", preds, gold)["score"] == pytest.approx(100 * mcc)


def test_pearson_spearman() -> None:
    gold = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    preds = gold ** 2  # monotone: Spearman 1, Pearson below 1
    m = compute_metrics("pearson_spearman", preds, gold)
    assert m["spearman"] == pytest.approx(100.0)
    assert m["pearson"] == pytest.approx(100 * np.corrcoef(preds, gold)[0, 1])
    assert compute_metrics("pearson_spearman", np.ones(5), gold)["score"] == 0.0


def test_task_score_averages_splits() -> None:
    assert task_score({"matched": {"score": 80.0}, "mismatched": {"score": 82.0}}) == 81.0


def test_the_dev_halves_are_fixed_disjoint_and_even() -> None:
    from mtp.evaluation import dev_halves

    first = dev_halves(11)
    assert first.sum() == 5 and (dev_halves(11) == first).all()  # the same split for every run
    assert dev_halves(10).sum() == 5 and not first[:5].all()  # shuffled: not the dev file's first rows
