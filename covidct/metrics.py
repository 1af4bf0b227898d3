"""Classification metrics for the COVID-CT classifier.

Convention: COVID-19 positive = 1 is the positive class for every metric,
non-COVID = 0. ``scores`` are any real numbers where larger means "more
COVID" (e.g. the predicted COVID probability); a sample is predicted
positive when ``score >= threshold``.

A ratio that is undefined (0/0, e.g. sensitivity with no positive samples)
is ``float('nan')``, never an exception. All inputs are host NumPy arrays.
"""
import math

import numpy as np
from scipy.stats import rankdata

from covidct.errors import CovidCTError

__all__ = [
    "confusion_counts",
    "metrics_from_counts",
    "roc_curve",
    "roc_auc",
    "threshold_for_sensitivity",
    "classification_metrics",
    "format_report",
    "bootstrap_ci",
]


# ----------------------------------------------------------------- helpers
def _check_labels(labels, name="labels"):
    """Return labels as a 1-D int array of 0/1; reject empty or other values."""
    labels = np.asarray(labels).ravel()
    if labels.size == 0:
        raise CovidCTError(f"{name} is empty: need at least one sample")
    if not np.all((labels == 0) | (labels == 1)):
        bad = labels[(labels != 0) & (labels != 1)][0]
        raise CovidCTError(f"{name} must be 0 (non-COVID) or 1 (COVID), got {bad!r}")
    return labels.astype(np.int64)


def _check_pair(labels, scores, name="scores"):
    """Check labels (0/1) and scores (finite numbers) of the same length."""
    labels = _check_labels(labels)
    scores = np.asarray(scores).ravel()
    if scores.shape != labels.shape:
        raise CovidCTError(
            f"labels and {name} differ in length: {labels.size} vs {scores.size}")
    try:
        scores = scores.astype(np.float64)
    except (TypeError, ValueError):
        raise CovidCTError(f"{name} must be numbers, got dtype {scores.dtype}") from None
    if not np.all(np.isfinite(scores)):
        raise CovidCTError(f"{name} contain NaN or infinite values")
    return labels, scores


def _ratio(num, den):
    """num / den as a float, or nan when den is 0."""
    return float(num) / float(den) if den != 0 else float("nan")


# ----------------------------------------------------------------- counts
def confusion_counts(labels, predicted):
    """Count tp, tn, fp, fn for 0/1 labels and 0/1 (or bool) predictions."""
    labels = _check_labels(labels)
    predicted = _check_labels(predicted, name="predicted")
    if predicted.shape != labels.shape:
        raise CovidCTError(
            f"labels and predicted differ in length: {labels.size} vs {predicted.size}")
    pos, pred = labels == 1, predicted == 1
    return {
        "tp": int(np.sum(pos & pred)),
        "tn": int(np.sum(~pos & ~pred)),
        "fp": int(np.sum(~pos & pred)),
        "fn": int(np.sum(pos & ~pred)),
    }


def metrics_from_counts(tp, tn, fp, fn):
    """All the confusion-matrix metrics from the four counts (nan when 0/0)."""
    tp, tn, fp, fn = int(tp), int(tn), int(fp), int(fn)
    total = tp + tn + fp + fn
    sensitivity = _ratio(tp, tp + fn)          # recall, true positive rate
    specificity = _ratio(tn, tn + fp)          # true negative rate
    # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)); floats avoid overflow
    den = float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn)
    mcc = (float(tp) * tn - float(fp) * fn) / math.sqrt(den) if den > 0 else float("nan")
    return {
        "accuracy": _ratio(tp + tn, total),
        "correct": tp + tn,
        "total": total,
        "tp": tp, "tn": tn, "fp": fp, "fn": fn,
        "false_positive_rate": _ratio(fp, fp + tn),
        "false_negative_rate": _ratio(fn, fn + tp),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sensitivity + specificity) / 2,   # nan if either is nan
        "mcc": mcc,
        "n_positive": tp + fn,
        "n_negative": tn + fp,
    }


# ----------------------------------------------------------------- ROC
def roc_curve(labels, scores):
    """ROC curve points, like ``sklearn.metrics.roc_curve`` (no point dropping).

    Returns ``(fpr, tpr, thresholds)``: point i is the rate pair when
    predicting COVID for ``score >= thresholds[i]``. Thresholds are the
    distinct scores in decreasing order, preceded by ``inf`` for the (0, 0)
    start point; tied scores form one point. With no negatives (or no
    positives) ``fpr`` (or ``tpr``) is all nan.
    """
    labels, scores = _check_pair(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    # the last index of every run of equal scores
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tps = np.cumsum(y)[ends]
    fps = (ends + 1) - tps
    n_pos, n_neg = int(labels.sum()), int(labels.size - labels.sum())
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    tpr = tps / n_pos if n_pos > 0 else np.full(tps.shape, np.nan)
    fpr = fps / n_neg if n_neg > 0 else np.full(fps.shape, np.nan)
    thresholds = np.r_[np.inf, s[ends]]
    return fpr, tpr, thresholds


def roc_auc(labels, scores):
    """Area under the ROC curve by the rank (Mann-Whitney U) formula.

    AUC = P(score of a random COVID case > score of a random non-COVID
    case), ties counting 1/2. With only one class present the AUC is
    undefined and ``float('nan')`` is returned.
    """
    labels, scores = _check_pair(labels, scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)                      # ties get the average rank
    u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def threshold_for_sensitivity(labels, scores, target):
    """Largest threshold t with sensitivity(score >= t) >= target.

    The answer is always one of the COVID cases' scores: the k-th largest,
    where k is the fewest positives giving ``k / n_positive >= target``.
    """
    labels, scores = _check_pair(labels, scores)
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise CovidCTError(f"target sensitivity must be a number, got {target!r}") from None
    if not 0.0 < target <= 1.0:
        raise CovidCTError(f"target sensitivity must be in (0, 1], got {target}")
    pos_scores = np.sort(scores[labels == 1])[::-1]       # largest first
    n_pos = pos_scores.size
    if n_pos == 0:
        raise CovidCTError("cannot pick a threshold for sensitivity: no COVID (label 1) samples")
    reached = np.arange(1, n_pos + 1) / n_pos >= target   # sensitivity with k positives
    k = int(np.argmax(reached)) + 1                       # reached[-1] is always True
    return float(pos_scores[k - 1])


# ----------------------------------------------------------------- summary
def classification_metrics(labels, scores, threshold=0.5):
    """Confusion counts, rates and AUC for predicting COVID when score >= threshold.

    Keys: accuracy, correct, total, tp, tn, fp, fn, false_positive_rate,
    false_negative_rate, sensitivity, specificity, precision, f1,
    balanced_accuracy, mcc, auc, threshold, n_positive, n_negative.
    Rates are fractions in [0, 1]; undefined ones are nan.
    """
    labels, scores = _check_pair(labels, scores)
    predicted = (scores >= threshold).astype(np.int64)
    out = metrics_from_counts(**confusion_counts(labels, predicted))
    out["auc"] = roc_auc(labels, scores)
    out["threshold"] = float(threshold)
    return out


def _pct(x):
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.2f}%"


def _num(x, fmt=".3f"):
    return "n/a" if x is None or math.isnan(x) else format(x, fmt)


def format_report(metrics):
    """Human-readable report: the 2020 report's nine lines, then the extras.

    ``metrics`` is a dict from ``classification_metrics`` (or any dict with
    tp, tn, fp, fn; missing rates are recomputed from the counts).
    """
    m = dict(metrics_from_counts(metrics["tp"], metrics["tn"], metrics["fp"], metrics["fn"]))
    m.update(metrics)
    lines = [
        f"Accuracy: {_pct(m['accuracy'])}",
        f"Correct: {m['correct']}",
        f"Total: {m['total']}",
        f"True positives: {m['tp']}",
        f"True negatives: {m['tn']}",
        f"False positives: {m['fp']}",
        f"False negatives: {m['fn']}",
        f"False positive rate: {_pct(m['false_positive_rate'])}",
        f"False negative rate: {_pct(m['false_negative_rate'])}",
        # beyond the 2020 report
        f"Sensitivity: {_pct(m['sensitivity'])}",
        f"Specificity: {_pct(m['specificity'])}",
        f"Precision: {_pct(m['precision'])}",
        f"F1: {_num(m['f1'])}",
        f"Balanced accuracy: {_pct(m['balanced_accuracy'])}",
        f"MCC: {_num(m['mcc'])}",
        f"ROC AUC: {_num(m.get('auc'))}",
        f"Threshold: {_num(m.get('threshold'), '.4g')}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------- bootstrap
def bootstrap_ci(labels, scores, metric_fn, n_boot=1000, seed=0, alpha=0.05,
                 stratified=True):
    """Percentile bootstrap confidence interval ``(low, high)`` for a metric.

    ``metric_fn(labels, scores) -> float`` is evaluated on ``n_boot``
    resamples drawn with replacement; with ``stratified=True`` the COVID
    and non-COVID cases are resampled separately, so every resample keeps
    the original class counts. Resamples where the metric is nan are
    skipped; if all are nan the result is ``(nan, nan)``.
    ``scores`` is (N,), or (R, N) when every case has R scores (R fold draws
    of a cross-validation): a resampled case brings all R of them, and the
    metric sees the R x N pairs (labels repeated R times).
    Example: ``bootstrap_ci(y, p, roc_auc)``.
    """
    labels = _check_labels(labels)
    draws = np.asarray(scores)
    draws = draws if draws.ndim == 2 else draws.reshape(1, -1)              # (R, N)
    if draws.shape[1] != labels.size:
        raise CovidCTError(f"labels and scores differ in length: {labels.size} vs {draws.shape[1]}")
    draws = _check_pair(np.tile(labels, len(draws)), draws)[1].reshape(draws.shape)
    if int(n_boot) < 1:
        raise CovidCTError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise CovidCTError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in (0, 1)] if stratified \
        else [np.arange(labels.size)]
    values = []
    for _ in range(int(n_boot)):
        idx = np.concatenate([rng.choice(g, size=g.size, replace=True)
                              for g in groups if g.size > 0])
        value = float(metric_fn(np.tile(labels[idx], len(draws)), draws[:, idx].ravel()))
        if not math.isnan(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)
