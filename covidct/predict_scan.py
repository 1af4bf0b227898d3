"""Predict on whole CT scans (DICOM series, DICOM files, NIfTI volumes): one P(COVID) per slice
and one per scan, with exactly the checkpoint's preprocessing after the CT window.

    predict_scan(model, meta, path)  -> ScanPrediction(rows, score, top_k, volume info)

Per-scan score: ``covidct.scan.scan_score``, the mean of the top-k slice probabilities
(k = 10 % of the slices, at least 1, unless given). The scan is labelled COVID when
that score reaches the checkpoint's threshold.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from . import CLASS_NAMES
from .evaluate import predict_proba
from .preprocess import Preprocess
from .scan import CTWindow, default_top_k, read_scan, scan_inputs, scan_score, window_from_metadata
from .texture import texture_inputs

SLICE_FIELDS = ["scan", "slice", "position_mm", "p_covid", "label"]


@dataclass
class ScanPrediction:
    source: str
    kind: str
    rows: list                 # one dict per slice: scan, slice, position_mm, p_covid, label
    score: float               # per-scan P(COVID): mean of the top_k slice probabilities
    top_k: int
    threshold: float
    window: CTWindow

    @property
    def label(self) -> str:
        return CLASS_NAMES[int(self.score >= self.threshold)]


def predict_scan(model, meta: dict, path, window: CTWindow | None = None, top_k: int | None = None,
                 series: str | None = None, device: str = "cpu", batch_size: int = 32) -> ScanPrediction:
    """Read the scan at ``path`` and score every slice with ``model`` (from load_checkpoint)."""
    window = window or window_from_metadata(meta)
    threshold = float(meta.get("threshold", 0.5))
    volume = read_scan(path, series=series)
    images = scan_inputs(volume, window, Preprocess.from_dict(meta["preprocess"]))
    features = texture_inputs(model, grays=window.apply(volume.hu))      # an ensemble with texture members
    p = predict_proba(model, images, meta["normalization"]["mean"], meta["normalization"]["std"],
                      batch_size=batch_size, device=device, features=features)
    rows = [{"scan": volume.source, "slice": i, "position_mm": round(float(z), 3), "p_covid": float(score),
             "label": CLASS_NAMES[int(score >= threshold)]} for i, (z, score) in enumerate(zip(volume.positions, p))]
    k = min(len(p), default_top_k(len(p)) if top_k is None else top_k)
    return ScanPrediction(volume.source, volume.kind, rows, scan_score(p, k), k, threshold, window)


def format_scan(prediction: ScanPrediction) -> str:
    """Per-slice table and the per-scan line."""
    lines = [f"{prediction.source} ({prediction.kind}, {len(prediction.rows)} slices, "
             f"window W{prediction.window.width:g}/L{prediction.window.level:g} HU)",
             "slice  position_mm  P(COVID)  label", "-----  -----------  --------  ---------"]
    lines += [f"{row['slice']:5d}  {row['position_mm']:11.2f}  {row['p_covid']:8.4f}  {row['label']}"
              for row in prediction.rows]
    lines.append(f"scan P(COVID) = {prediction.score:.4f} (mean of the top {prediction.top_k} of "
                 f"{len(prediction.rows)} slices) -> {prediction.label} "
                 f"(COVID when >= {prediction.threshold:.4g})")
    return "\n".join(lines)


def write_slice_rows(predictions, path) -> Path:
    """One CSV row per slice of every scan: scan, slice, position_mm, p_covid, label."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=SLICE_FIELDS)
        writer.writeheader()
        for prediction in predictions:
            writer.writerows(prediction.rows)
    return path
