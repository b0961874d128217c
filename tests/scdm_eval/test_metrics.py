"""Per-fold metrics (sensitive = positive), NaN-with-reason when undefined, and the t-interval summary."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from scdm_eval import METRICS, compute_metrics, summarize
from scdm_eval._metrics import mean_ci


def test_known_values():
    m = compute_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    # predictions at 0.5: [0, 0, 0, 1] -> tp 1, fp 0, fn 1, tn 2
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["auroc"] == pytest.approx(0.75)
    assert m["auprc"] == pytest.approx((1.0 + 2 / 3) / 2)  # average precision: P@rank1 = 1, P@rank3 = 2/3
    assert m["reason"] == ""
    assert set(METRICS) <= set(m)


def test_resistant_is_not_the_positive_class():
    y = np.array([1, 1, 1, 0])
    flipped = compute_metrics(1 - y, np.array([0.1, 0.1, 0.1, 0.9]))
    straight = compute_metrics(y, np.array([0.9, 0.9, 0.9, 0.1]))
    assert straight["precision"] == straight["recall"] == 1.0
    assert flipped["precision"] == flipped["recall"] == 1.0
    wrong = compute_metrics(y, np.array([0.1, 0.1, 0.1, 0.9]))  # predicts the resistant cell as sensitive
    assert wrong["recall"] == 0.0 and wrong["precision"] == 0.0 and wrong["f1"] == 0.0  # defined, truly zero


def test_single_class_test_set_gives_nan_with_reason_never_zero():
    m = compute_metrics(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.7]))
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == 1.0
    assert "auroc, auprc: test cells are all sensitive" in m["reason"]

    m = compute_metrics(np.array([0, 0]), np.array([0.1, 0.2]))
    assert m["accuracy"] == 1.0
    for k in ("auroc", "auprc", "precision", "recall", "f1"):
        assert math.isnan(m[k]), k
    assert "all resistant" in m["reason"] and "no cell predicted sensitive" in m["reason"]
    assert "recall" in m["reason"] and "f1" in m["reason"]


def test_input_checks():
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 1]), np.array([0.5]))
    m = compute_metrics(np.array([], dtype=int), np.array([]))
    assert all(math.isnan(m[k]) for k in METRICS) and "empty" in m["reason"]


def test_mean_ci_is_a_student_t_interval():
    mean, sd, lo, hi, n = mean_ci(np.array([0.8, 0.9, 1.0, np.nan]))
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 d.f.)
    assert (mean, n) == (pytest.approx(0.9), 3)
    assert sd == pytest.approx(0.1)
    assert (lo, hi) == (pytest.approx(0.9 - half), pytest.approx(0.9 + half))
    one = mean_ci(np.array([0.7]))
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2]) and one[4] == 1
    assert mean_ci(np.array([np.nan]))[4] == 0


def test_summarize_groups_folds_clips_and_counts_defined():
    rows = []
    for fold, (auroc, f1) in enumerate([(0.9, 0.8), (1.0, 0.7), (np.nan, 0.9)]):
        rows.append({"model": "m", "scheme": "pooled", "by": "all", "category": "all", "classifier": "logreg",
                     "fold": fold, "n_test": 10, "f1": f1, "auroc": auroc, "auprc": auroc, "accuracy": 0.5,
                     "precision": 0.5, "recall": 0.5, "reason": "" if fold < 2 else "auroc, auprc: test cells are all resistant"})
    s = summarize(pd.DataFrame(rows))
    assert len(s) == 1
    r = s.iloc[0]
    assert r["n_folds"] == 3 and r["n_cells"] == 30
    assert r["auroc_n"] == 2 and r["auroc_mean"] == pytest.approx(0.95)
    assert r["auroc_ci_high"] == 1.0  # the t-interval is clipped to the metric's range
    assert r["f1_n"] == 3 and r["f1_sd"] == pytest.approx(0.1)
    assert r["accuracy_sd"] == 0.0 and r["accuracy_ci_low"] == pytest.approx(0.5)
