"""Evaluation: P(COVID) for a set of images, the report's metric block, and its files.

COVID is the positive class. A prediction is COVID when P(COVID) >= threshold;
the threshold is 0.5 unless one was chosen on the validation split to reach a
target sensitivity (stored in the checkpoint).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

import minicnn as mc

from . import CLASS_NAMES
from .metrics import classification_metrics, format_report, threshold_for_sensitivity
from .preprocess import normalize


def softmax(logits) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_logits(model: mc.Module, images: np.ndarray, mean: float, std: float, batch_size: int = 64,
                   device: str = "cpu", features=None) -> np.ndarray:
    """images (N, C, H, W) in [0, 1] -> host logits (N, classes), computed in eval mode, batch by batch.
    features: the slices' lung-texture features (N, 94 x T), for an ensemble with T texture members
    (covidct.ensemble.reads_texture; covidct.texture.texture_features)."""
    was_training = model.training
    model.eval()
    logits = []
    with mc.no_grad():                     # no backward follows: nothing is kept, activations freed at once
        for start in range(0, len(images), batch_size):
            batch = mc.to_device(normalize(images[start:start + batch_size], mean, std), device)
            if features is None:
                logits.append(mc.as_numpy(model(batch)))
            else:
                logits.append(mc.as_numpy(model(batch, features[start:start + batch_size])))
    model.release_saved()                  # and the layers' reusable work buffers
    model.train(was_training)
    return np.concatenate(logits) if logits else np.zeros((0, 0), np.float32)


def predict_proba(model: mc.Module, images: np.ndarray, mean: float, std: float, batch_size: int = 64,
                  device: str = "cpu", features=None) -> np.ndarray:
    """images (N, C, H, W) in [0, 1] (+ features: see predict_logits) -> P(COVID) (N,), computed in eval
    mode, batch by batch."""
    if len(images) == 0:
        return np.zeros(0)
    logits = predict_logits(model, images, mean, std, batch_size, device, features)
    return softmax(logits.astype(np.float64))[:, 1]


def predict_checkpoint(path, images: np.ndarray, device: str = "cpu", tta: bool = False) -> np.ndarray:
    """P(COVID) of a checkpoint's model on in-memory images (N, 1, H, W), on the checkpoint's own
    normalisation; tta: the model as a one-member ensemble with test-time augmentation (the slice and
    its mirror image joined by the mean of their log-odds), as a saved ensemble with tta predicts."""
    from .checkpoint import load_checkpoint

    model, meta = load_checkpoint(path, device)
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    if tta:
        from .ensemble import Ensemble
        model, mean, std = Ensemble([model], [(mean, std)], tta=True, combine="geometric"), 0.0, 1.0
    return predict_proba(model, images, mean, std, device=device)


def choose_threshold(labels, scores, target_sensitivity: float | None) -> float:
    """0.5, or the largest threshold that reaches the target sensitivity on these (validation) labels."""
    if target_sensitivity is None:
        return 0.5
    return float(threshold_for_sensitivity(labels, scores, target_sensitivity))


def report_text(labels, scores, threshold: float, title: str) -> str:
    """The report's block at the chosen threshold and, if different, at 0.5."""
    blocks = [f"== {title} (threshold {threshold:.4g}) ==",
              format_report(classification_metrics(labels, scores, threshold))]
    if abs(threshold - 0.5) > 1e-12:
        blocks += [f"\n== {title} (threshold 0.5) ==", format_report(classification_metrics(labels, scores, 0.5))]
    return "\n".join(blocks)


def write_evaluation(out_dir, labels, scores, paths, threshold: float, title: str = "evaluation") -> dict:
    """Write metrics.json, predictions.csv, roc.png and confusion.png; return the metrics."""
    from .plots import plot_confusion, plot_roc  # matplotlib only when files are written

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"threshold": classification_metrics(labels, scores, threshold),
               "threshold_0.5": classification_metrics(labels, scores, 0.5)}
    (out_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    with open(out_dir / "predictions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "label", "p_covid", "predicted", "predicted_name"])
        for path, label, score in zip(paths, labels, scores):
            predicted = int(score >= threshold)
            writer.writerow([path, int(label), f"{score:.6f}", predicted, CLASS_NAMES[predicted]])
    marks = {"0.5": 0.5} if abs(threshold - 0.5) < 1e-12 else {"0.5": 0.5, f"chosen {threshold:.3g}": threshold}
    plot_roc(labels, scores, out_dir / "roc.png", title=f"ROC: {title}", thresholds=marks)
    plot_confusion(metrics["threshold"], out_dir / "confusion.png", title=f"{title} (threshold {threshold:.3g})")
    return metrics


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
