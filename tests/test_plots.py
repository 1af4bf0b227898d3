"""Tests for covidct.plots: each function writes a real, non-trivial PNG."""
import numpy as np
import pandas as pd
import pytest

from covidct.errors import CovidCTError
from covidct.metrics import classification_metrics, confusion_counts, threshold_for_sensitivity
from covidct.plots import plot_confusion, plot_history, plot_roc

from pictures import assert_picture

ROC_SIZE, CONFUSION_SIZE = (5.5 * 120, 5.5 * 120), (5 * 120, 4.3 * 120)   # figsize * covidct.plots.DPI


def assert_png(path, size=None):
    assert_picture(path, size)


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
    assert_png(path, ROC_SIZE)


def test_plot_roc_one_class(tmp_path):
    path = plot_roc([1, 1, 1], [0.2, 0.5, 0.9], tmp_path / "sub" / "roc1.png",
                    thresholds={"0.5": 0.5})
    assert_png(path)


def test_plot_confusion(data, tmp_path):
    labels, scores = data
    assert_png(plot_confusion(classification_metrics(labels, scores), tmp_path / "cm.png"), CONFUSION_SIZE)
    counts = confusion_counts(labels, scores >= 0.5)
    assert_png(plot_confusion(counts, tmp_path / "cm2.png", title="counts only"))
    assert_png(plot_confusion({"tp": 0, "tn": 3, "fp": 1, "fn": 0}, tmp_path / "cm3.png"))


@pytest.mark.parametrize("counts, diagonal", [({"tp": 5, "tn": 5, "fp": 0, "fn": 0}, True),
                                              ({"tp": 0, "tn": 0, "fp": 5, "fn": 5}, False)])
def test_plot_confusion_colours_the_right_cells(tmp_path, counts, diagonal):
    """Fraction 1 is the darkest blue: all-correct counts darken the diagonal, all-wrong the other two cells."""
    pixels = assert_picture(plot_confusion(counts, tmp_path / "cm.png"), CONFUSION_SIZE).astype(int)
    darkest = np.array([8, 48, 107])                     # matplotlib's "Blues" at 1.0
    matrix = pixels[:, : int(pixels.shape[1] * 0.75)]    # leave out the colour bar on the right
    rows, cols = np.nonzero(np.abs(matrix - darkest).sum(axis=2) < 30)
    assert len(rows) > 0.05 * matrix.shape[0] * matrix.shape[1]        # two of the four cells are dark
    middle = (rows.min() + rows.max()) / 2
    top, bottom = cols[rows < middle].mean(), cols[rows > middle].mean()
    assert (top < bottom) == diagonal                    # dark cells top-left + bottom-right, or the other two


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
