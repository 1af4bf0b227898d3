"""Figures for the COVID-CT classifier: ROC curve, confusion matrix, training curves.

Every function writes one PNG file, closes its figure and returns the path.
Matplotlib runs with the non-interactive Agg backend, so no display is needed.
"""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must come after matplotlib.use)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from covidct import CLASS_NAMES  # noqa: E402
from covidct.errors import CovidCTError  # noqa: E402
from covidct.metrics import roc_auc, roc_curve  # noqa: E402

__all__ = ["plot_roc", "plot_confusion", "plot_history"]

DPI = 120


def _save(fig, path):
    """Write the figure as PNG (creating the folder), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def plot_roc(labels, scores, path, title=None, thresholds=None):
    """ROC curve with the AUC in the legend, the chance diagonal, and operating points.

    ``thresholds`` maps a name to a threshold, e.g. ``{"0.5": 0.5, "sens 0.9": t}``;
    each is marked at its (FPR, TPR) for predicting COVID when score >= t.
    """
    fpr, tpr, _ = roc_curve(labels, scores)          # also checks the inputs
    auc = roc_auc(labels, scores)
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    auc_text = "n/a" if math.isnan(auc) else f"{auc:.3f}"

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"ROC (AUC = {auc_text})")

    n_pos = int(np.sum(labels == 1))
    n_neg = int(np.sum(labels == 0))
    markers = ["o", "s", "D", "^", "v", "P", "X"]
    for i, (name, t) in enumerate((thresholds or {}).items()):
        predicted = scores >= t
        sens = np.sum(predicted & (labels == 1)) / n_pos if n_pos else float("nan")
        fp_rate = np.sum(predicted & (labels == 0)) / n_neg if n_neg else float("nan")
        ax.plot(fp_rate, sens, marker=markers[i % len(markers)], markersize=9,
                linestyle="none", markeredgecolor="black", zorder=3,
                label=f"{name} (t={t:.3g}): sens {100 * sens:.1f}%, spec {100 * (1 - fp_rate):.1f}%")

    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title or f"ROC curve (COVID = positive, n = {labels.size})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(metrics_or_counts, path, title=None):
    """2x2 confusion matrix: counts and row percentages; rows true, columns predicted.

    ``metrics_or_counts`` is any dict with tp, tn, fp, fn (e.g. from
    ``classification_metrics`` or ``confusion_counts``).
    """
    m = metrics_or_counts
    try:
        matrix = np.array([[m["tn"], m["fp"]],
                           [m["fn"], m["tp"]]], dtype=np.int64)
    except KeyError as err:
        raise CovidCTError(f"plot_confusion needs counts tp, tn, fp, fn; missing {err}") from None
    row_totals = matrix.sum(axis=1, keepdims=True)
    row_frac = np.divide(matrix, row_totals, out=np.zeros(matrix.shape), where=row_totals > 0)

    fig, ax = plt.subplots(figsize=(5, 4.3))
    image = ax.imshow(row_frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            pct = f"{100 * row_frac[i, j]:.1f}%" if row_totals[i, 0] > 0 else "n/a"
            color = "white" if row_frac[i, j] > 0.6 else "black"
            ax.text(j, i, f"{matrix[i, j]}\n{pct}", ha="center", va="center",
                    fontsize=14, color=color)
    ax.set_xticks([0, 1])
    ax.set_yticks([0, 1])
    ax.set_xticklabels(CLASS_NAMES)
    ax.set_yticklabels(CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = int(matrix.sum())
    accuracy = f"{100 * np.trace(matrix) / total:.2f}%" if total else "n/a"
    ax.set_title(title or f"Confusion matrix (accuracy {accuracy}, n = {total})")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    return _save(fig, path)


# panel name -> how to recognise its columns
_PANELS = [("Loss", "loss"), ("Accuracy", "acc"), ("AUC", "auc")]


def plot_history(history, path, title=None):
    """Training curves from per-epoch dicts or a DataFrame.

    Columns whose name contains "loss", "acc" or "auc" (e.g. train_loss,
    val_loss, train_accuracy, val_accuracy, val_auc) go in a Loss, Accuracy
    or AUC panel; panels with no columns are left out. The x axis is the
    ``epoch`` column if there is one, else 1, 2, 3, ...
    """
    df = history if isinstance(history, pd.DataFrame) else pd.DataFrame(list(history))
    if len(df) == 0:
        raise CovidCTError("plot_history: the history is empty (no epochs)")
    x = df["epoch"].to_numpy() if "epoch" in df.columns else np.arange(1, len(df) + 1)

    panels = []
    for name, key in _PANELS:
        cols = [c for c in df.columns if key in str(c).lower() and c != "epoch"
                and pd.api.types.is_numeric_dtype(df[c])]
        if cols:
            panels.append((name, cols))
    if not panels:
        raise CovidCTError("plot_history: no loss, accuracy or AUC columns in the history; "
                           f"got {list(df.columns)}")

    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (name, cols) in zip(axes[0], panels):
        for col in cols:
            y = df[col].to_numpy(dtype=np.float64)
            keep = np.isfinite(y)                       # e.g. validation every few epochs
            low = str(col).lower()
            if low.startswith("train"):
                style = {"linestyle": "--", "color": "tab:blue"}
            elif low.startswith("val"):
                style = {"linestyle": "-", "color": "tab:orange"}
            else:
                style = {"linestyle": "-"}
            ax.plot(x[keep], y[keep], marker="o", markersize=3, label=str(col), **style)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
