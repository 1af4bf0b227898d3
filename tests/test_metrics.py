"""Tests for covidct.metrics (COVID = 1 is the positive class)."""
import math

import numpy as np
import pytest

from covidct.errors import CovidCTError
from covidct.metrics import (
    bootstrap_ci,
    classification_metrics,
    confusion_counts,
    format_report,
    metrics_from_counts,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
)


def make_arrays(tp, tn, fp, fn):
    """Labels and 0/1 predictions with exactly these confusion counts."""
    labels = np.array([1] * tp + [0] * tn + [0] * fp + [1] * fn)
    predicted = np.array([1] * tp + [0] * tn + [1] * fp + [0] * fn)
    return labels, predicted


# The 2020 report's four rounds: counts and the percentages it printed.
ROUNDS = [
    # (tp, tn, fp, fn), accuracy, FPR, FNR
    ((2, 51, 16, 26), "55.79%", "23.88%", "92.86%"),
    ((2, 67, 0, 26), "72.63%", "0.00%", "92.86%"),
    ((2, 34, 33, 26), "37.89%", "49.25%", "92.86%"),
    ((13, 51, 16, 15), "67.37%", "23.88%", "53.57%"),
]


def brute_auc(labels, scores):
    """AUC by counting all (positive, negative) pairs; ties count 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


# ----------------------------------------------------------- confusion counts
@pytest.mark.parametrize("counts, acc, fpr, fnr", ROUNDS)
def test_report_rounds(counts, acc, fpr, fnr):
    tp, tn, fp, fn = counts
    labels, predicted = make_arrays(*counts)
    assert confusion_counts(labels, predicted) == {"tp": tp, "tn": tn, "fp": fp, "fn": fn}
    m = classification_metrics(labels, predicted.astype(float), threshold=0.5)
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == counts
    assert m["total"] == 95 and m["correct"] == tp + tn
    assert f"{100 * m['accuracy']:.2f}%" == acc
    assert f"{100 * m['false_positive_rate']:.2f}%" == fpr
    assert f"{100 * m['false_negative_rate']:.2f}%" == fnr
    assert m["n_positive"] == 28 and m["n_negative"] == 67
    report = format_report(m).splitlines()
    assert report[0] == f"Accuracy: {acc}"
    assert report[7] == f"False positive rate: {fpr}"
    assert report[8] == f"False negative rate: {fnr}"


def test_format_report_round4_exact():
    labels, predicted = make_arrays(13, 51, 16, 15)
    report = format_report(classification_metrics(labels, predicted))
    expected = [
        "Accuracy: 67.37%",
        "Correct: 64",
        "Total: 95",
        "True positives: 13",
        "True negatives: 51",
        "False positives: 16",
        "False negatives: 15",
        "False positive rate: 23.88%",
        "False negative rate: 53.57%",
    ]
    lines = report.splitlines()
    assert lines[:9] == expected
    rest = "\n".join(lines[9:])
    for name in ("Sensitivity: 46.43%", "Specificity: 76.12%", "Precision: 44.83%",
                 "F1:", "Balanced accuracy:", "MCC:", "ROC AUC:", "Threshold: 0.5"):
        assert name in rest


def test_format_report_from_counts_only():
    lines = format_report({"tp": 13, "tn": 51, "fp": 16, "fn": 15}).splitlines()
    assert lines[0] == "Accuracy: 67.37%"
    assert "ROC AUC: n/a" in lines


def test_hand_computed_metrics():
    m = metrics_from_counts(tp=3, tn=4, fp=1, fn=2)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert m["balanced_accuracy"] == pytest.approx(0.7)


def test_threshold_is_inclusive():
    m = classification_metrics([0, 1, 1], [0.5, 0.5, 0.2], threshold=0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 0)


# ----------------------------------------------------------- MCC
@pytest.mark.parametrize("counts", [(13, 51, 16, 15), (2, 51, 16, 26), (5, 5, 0, 0),
                                    (0, 0, 5, 5), (7, 3, 9, 1)])
def test_mcc_formula(counts):
    tp, tn, fp, fn = counts
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    labels, predicted = make_arrays(*counts)
    assert classification_metrics(labels, predicted)["mcc"] == pytest.approx(expected)


def test_mcc_perfect_and_inverted():
    assert metrics_from_counts(5, 5, 0, 0)["mcc"] == pytest.approx(1.0)
    assert metrics_from_counts(0, 0, 5, 5)["mcc"] == pytest.approx(-1.0)


def test_undefined_ratios_are_nan():
    # all negatives, all predicted negative: sensitivity, precision, F1, MCC are 0/0
    m = classification_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert m["accuracy"] == 1.0 and m["specificity"] == 1.0
    for key in ("sensitivity", "false_negative_rate", "precision", "f1", "mcc",
                "balanced_accuracy", "auc"):
        assert math.isnan(m[key]), key


def test_metrics_invariant_to_permutation():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 1)           # plenty of ties
    perm = rng.permutation(200)
    a = classification_metrics(labels, scores, threshold=0.4)
    b = classification_metrics(labels[perm], scores[perm], threshold=0.4)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key]), key
    assert threshold_for_sensitivity(labels, scores, 0.8) == \
        threshold_for_sensitivity(labels[perm], scores[perm], 0.8)


# ----------------------------------------------------------- AUC and ROC
def test_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for n in (2, 7, 50, 301):
        labels = rng.integers(0, 2, n)
        labels[0], labels[1] = 0, 1                  # both classes present
        scores = rng.integers(0, 6, n) / 5.0         # heavy ties
        assert roc_auc(labels, scores) == pytest.approx(brute_auc(labels, scores))
        # the trapezoid area under roc_curve agrees too
        fpr, tpr, _ = roc_curve(labels, scores)
        area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
        assert area == pytest.approx(brute_auc(labels, scores))


def test_auc_perfect_reversed_and_constant():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert roc_auc(labels, scores) == 1.0
    assert roc_auc(labels, -scores) == 0.0
    assert roc_auc(labels, np.full(5, 0.7)) == 0.5


def test_one_class_only_gives_nan_auc_and_report_formats():
    labels = np.ones(4, dtype=int)
    scores = np.array([0.2, 0.6, 0.7, 0.9])
    assert math.isnan(roc_auc(labels, scores))
    m = classification_metrics(labels, scores)
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"])
    report = format_report(m)
    assert "ROC AUC: n/a" in report and "Specificity: n/a" in report
    fpr, tpr, thr = roc_curve(labels, scores)
    assert np.all(np.isnan(fpr)) and tpr[-1] == 1.0


def test_roc_curve_like_sklearn():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    fpr, tpr, thr = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_roc_curve_ties_form_one_point():
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.5, 0.5, 0.5, 0.9])
    fpr, tpr, thr = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5])


@pytest.mark.parametrize("fn", [roc_auc, roc_curve, classification_metrics])
def test_empty_input_raises(fn):
    with pytest.raises(CovidCTError):
        fn([], [])


def test_bad_inputs_raise():
    with pytest.raises(CovidCTError):
        roc_auc([0, 1, 2], [0.1, 0.2, 0.3])          # label 2
    with pytest.raises(CovidCTError):
        roc_auc([0, 1], [0.1, 0.2, 0.3])             # length mismatch
    with pytest.raises(CovidCTError):
        roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(CovidCTError):
        confusion_counts([], [])


# ----------------------------------------------------------- threshold
def test_threshold_for_sensitivity_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(30):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[0] = 1
        scores = np.round(rng.random(n), 1)
        target = float(rng.choice([0.01, 0.25, 0.5, 0.8, 0.9, 0.95, 1.0]))
        t = threshold_for_sensitivity(labels, scores, target)
        sens = lambda thr: np.mean(scores[labels == 1] >= thr)  # noqa: E731
        assert sens(t) >= target
        # brute force: among all candidate thresholds (every score, and just
        # above each), the largest one that reaches the target
        candidates = np.unique(np.r_[scores, np.nextafter(scores, np.inf)])
        best = max(c for c in candidates if sens(c) >= target)
        assert t == best


def test_threshold_for_sensitivity_simple():
    labels = [1, 1, 1, 1, 0, 0]
    scores = [0.9, 0.8, 0.3, 0.1, 0.5, 0.2]
    assert threshold_for_sensitivity(labels, scores, 0.5) == 0.8
    assert threshold_for_sensitivity(labels, scores, 0.51) == 0.3
    assert threshold_for_sensitivity(labels, scores, 0.75) == 0.3
    assert threshold_for_sensitivity(labels, scores, 1.0) == 0.1
    assert threshold_for_sensitivity([1, 1, 1], [0.9, 0.8, 0.7], 0.9) == 0.7


@pytest.mark.parametrize("target", [0, -0.1, 1.01, float("nan")])
def test_threshold_for_sensitivity_bad_target(target):
    with pytest.raises(CovidCTError, match="target"):
        threshold_for_sensitivity([0, 1], [0.2, 0.8], target)


def test_threshold_for_sensitivity_no_positives():
    with pytest.raises(CovidCTError, match="no COVID"):
        threshold_for_sensitivity([0, 0], [0.2, 0.8], 0.9)


# ----------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_estimate_and_is_reproducible():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 200)
    scores = labels * 0.6 + rng.random(200)
    auc = roc_auc(labels, scores)
    low, high = bootstrap_ci(labels, scores, roc_auc, n_boot=300, seed=1)
    assert low <= auc <= high and high - low < 0.3
    assert (low, high) == bootstrap_ci(labels, scores, roc_auc, n_boot=300, seed=1)


def test_bootstrap_ci_unstratified_and_nan_skipping():
    labels = np.array([0] * 20 + [1])                 # one positive: unstratified
    scores = np.linspace(0, 1, 21)                    # resamples often miss it -> nan AUC
    low, high = bootstrap_ci(labels, scores, roc_auc, n_boot=200, stratified=False)
    assert low == high == 1.0
    low, high = bootstrap_ci(np.zeros(5), scores[:5], roc_auc, n_boot=20)
    assert math.isnan(low) and math.isnan(high)
    acc = lambda y, s: classification_metrics(y, s)["accuracy"]  # noqa: E731
    low, high = bootstrap_ci(labels, scores, acc, n_boot=100)
    assert 0.0 <= low <= high <= 1.0


def test_bootstrap_ci_of_several_scores_per_case_resamples_cases():
    """(R, N) scores: a resampled case brings its R scores; one row is the (N,) case, and R equal rows
    give its interval (the same pairs, R^2 times over); a row of the wrong length is refused."""
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 120)
    scores = labels * 0.5 + rng.random(120)
    alone = bootstrap_ci(labels, scores, roc_auc, n_boot=200, seed=2)
    assert bootstrap_ci(labels, scores[None], roc_auc, n_boot=200, seed=2) == alone
    assert bootstrap_ci(labels, np.stack([scores, scores]), roc_auc, n_boot=200, seed=2) == pytest.approx(alone)
    other = labels * 0.5 + rng.random(120)
    low, high = bootstrap_ci(labels, np.stack([scores, other]), roc_auc, n_boot=200, seed=2)
    pooled = roc_auc(np.tile(labels, 2), np.concatenate([scores, other]))
    assert low <= pooled <= high and (low, high) != alone
    with pytest.raises(CovidCTError, match="differ in length: 120 vs 119"):
        bootstrap_ci(labels, np.stack([scores, other])[:, :119], roc_auc)


def test_bootstrap_ci_bad_alpha():
    with pytest.raises(CovidCTError):
        bootstrap_ci([0, 1], [0.1, 0.9], roc_auc, alpha=1.5)
