"""Tests for covidct.plots: each function writes a real, non-trivial PNG."""
import numpy as np
import pandas as pd
import pytest

from covidct.errors import CovidCTError
from covidct.metrics import classification_metrics, confusion_counts, threshold_for_sensitivity
from covidct.plots import plot_confusion, plot_history, plot_roc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.exists()
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert path.stat().st_size > 1024


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    scores = np.clip(0.3 * labels + 0.7 * rng.random(120), 0, 1)
    return labels, scores


def test_plot_roc(data, tmp_path):
    labels, scores = data
    t90 = threshold_for_sensitivity(labels, scores, 0.9)
    path = plot_roc(labels, scores, tmp_path / "roc.png", title="Validation ROC",
                    thresholds={"0.5": 0.5, "sens 0.9": t90})
    assert_png(path)


def test_plot_roc_one_class(tmp_path):
    path = plot_roc([1, 1, 1], [0.2, 0.5, 0.9], tmp_path / "sub" / "roc1.png",
                    thresholds={"0.5": 0.5})
    assert_png(path)


def test_plot_confusion(data, tmp_path):
    labels, scores = data
    assert_png(plot_confusion(classification_metrics(labels, scores), tmp_path / "cm.png"))
    counts = confusion_counts(labels, scores >= 0.5)
    assert_png(plot_confusion(counts, tmp_path / "cm2.png", title="counts only"))
    assert_png(plot_confusion({"tp": 0, "tn": 3, "fp": 1, "fn": 0}, tmp_path / "cm3.png"))


def test_plot_confusion_missing_counts(tmp_path):
    with pytest.raises(CovidCTError):
        plot_confusion({"tp": 1}, tmp_path / "bad.png")


def make_history(n=8):
    return [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e,
             "train_accuracy": 1 - 0.5 / e, "val_accuracy": 1 - 0.6 / e,
             "val_auc": 1 - 0.4 / e} for e in range(1, n + 1)]


def test_plot_history_list_and_dataframe(tmp_path):
    assert_png(plot_history(make_history(), tmp_path / "hist.png"))
    df = pd.DataFrame(make_history()).drop(columns=["val_auc", "epoch"])
    assert_png(plot_history(df, tmp_path / "hist2.png"))


def test_plot_history_missing_values(tmp_path):
    rows = make_history(6)
    for row in rows[::2]:
        del row["val_loss"]                     # validation every other epoch
    assert_png(plot_history(rows, tmp_path / "hist3.png"))


def test_plot_history_empty(tmp_path):
    with pytest.raises(CovidCTError):
        plot_history([], tmp_path / "empty.png")
    with pytest.raises(CovidCTError):
        plot_history([{"epoch": 1, "lr": 0.1}], tmp_path / "nothing.png")
