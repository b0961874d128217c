"""Per-fold metrics with sensitive (1) as the positive class, and fold aggregation.

A metric that is undefined on a fold (AUROC with one class in the test cells, precision
with no cell predicted sensitive, ...) is NaN and the fold's ``reason`` says why; it is
never reported as 0.0.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

#: Metric names, in report order.
METRICS: tuple[str, ...] = ("f1", "auroc", "auprc", "accuracy", "precision", "recall", "brier", "ece")
#: Metrics where lower is better (calibration errors); every other metric is higher-is-better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"brier", "ece"})
#: Equal-width P(sensitive) bins of the expected calibration error.
ECE_BINS = 10


def calibration(y_true: np.ndarray, proba: np.ndarray, *, bins: int = ECE_BINS) -> tuple[float, float]:
    """Brier score (mean squared error of P(sensitive)) and expected calibration error.

    ECE: ``bins`` equal-width bins over [0, 1]; the cell-weighted mean over bins of
    |observed sensitive fraction - mean P(sensitive)|. Both are NaN on an empty set.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(proba, dtype=np.float64).ravel()
    if y.size == 0:
        return math.nan, math.nan
    brier = float(np.mean((p - y) ** 2))
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    n = np.bincount(idx, minlength=bins)
    gap = np.abs(np.bincount(idx, weights=y, minlength=bins) - np.bincount(idx, weights=p, minlength=bins))
    return brier, float(gap.sum() / y.size) if n.sum() else math.nan


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, *, threshold: float = 0.5) -> dict[str, float | str]:
    """F1, AUROC, AUPRC, accuracy, precision, recall, Brier score and ECE of one test fold.

    ``proba`` is P(sensitive); predictions are ``proba >= threshold``. Returns the metrics
    plus ``reason``: ``""`` when all are defined, else ``"metric, metric: why; ..."``.
    """
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(proba, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but proba has {p.size}")
    if y.size == 0:
        return {**dict.fromkeys(METRICS, math.nan), "reason": "all: empty test set"}
    pred = p >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    reasons: dict[str, list[str]] = {}

    def why(metric: str, text: str) -> float:
        reasons.setdefault(text, []).append(metric)
        return math.nan

    out: dict[str, float | str] = {}
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos and n_neg:
        out["auroc"] = float(roc_auc_score(y, p))
        out["auprc"] = float(average_precision_score(y, p))
    else:
        only = "sensitive" if n_pos else "resistant"
        out["auroc"] = why("auroc", f"test cells are all {only}")
        out["auprc"] = why("auprc", f"test cells are all {only}")
    out["accuracy"] = float(np.mean(pred == pos))
    out["precision"] = tp / (tp + fp) if tp + fp else why("precision", "no cell predicted sensitive")
    out["recall"] = tp / (tp + fn) if tp + fn else why("recall", "no sensitive cell in the test set")
    denom = 2 * tp + fp + fn
    out["f1"] = 2 * tp / denom if denom else why("f1", "no sensitive cell in the test set and none predicted")
    out["brier"], out["ece"] = calibration(y, p)
    result: dict[str, float | str] = {m: float(out[m]) for m in METRICS}
    result["reason"] = "; ".join(f"{', '.join(ms)}: {text}" for text, ms in reasons.items())
    return result


def mean_ci(values: np.ndarray, *, level: float = 0.95) -> tuple[float, float, float, float, int]:
    """Mean, s.d. (ddof 1), and the two-sided Student-t ``level`` interval of the mean.

    NaNs are dropped first; returns ``(mean, sd, low, high, n)``. With one value the s.d.
    and interval are NaN; with none everything is NaN and ``n`` is 0.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    n = int(v.size)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan, 1
    from scipy import stats

    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half, n
