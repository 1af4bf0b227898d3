"""Predict: P(COVID) for image files, with exactly the checkpoint's preprocessing."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from . import CLASS_NAMES
from .checkpoint import load_checkpoint
from .errors import CovidCTError
from .evaluate import predict_proba
from .preprocess import Preprocess, load_image
from .texture import texture_inputs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def collect_images(paths) -> list[Path]:
    """Files as given, and image files found recursively in directories (sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.append(path)
        else:
            raise CovidCTError(f"{path}: no such file or directory")
    if not found:
        raise CovidCTError(f"no image files found in {', '.join(map(str, paths))}")
    return found


def predict_files(checkpoint, paths, device: str = "cpu", batch_size: int = 32):
    """-> (rows, failures). rows: dicts(file, p_covid, label); failures: (file, reason).

    An unreadable file is reported in ``failures`` and never stops the others.
    """
    model, meta = load_checkpoint(checkpoint, device)
    preprocess = Preprocess.from_dict(meta["preprocess"])
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    threshold = float(meta.get("threshold", 0.5))
    images, good, failures = [], [], []
    for path in collect_images(paths):
        try:
            images.append(load_image(path, preprocess))
            good.append(path)
        except CovidCTError as error:
            failures.append((str(path), str(error)))
    rows = []
    if images:
        scores = predict_proba(model, np.stack(images), mean, std, batch_size=batch_size, device=device,
                               features=texture_inputs(model, good))
        rows = [{"file": str(path), "p_covid": float(score), "label": CLASS_NAMES[int(score >= threshold)]}
                for path, score in zip(good, scores)]
    return rows, failures, threshold


def format_table(rows) -> str:
    width = max([len("file")] + [len(row["file"]) for row in rows])
    lines = [f"{'file':<{width}}  P(COVID)  label", f"{'-' * width}  --------  ---------"]
    lines += [f"{row['file']:<{width}}  {row['p_covid']:8.4f}  {row['label']}" for row in rows]
    return "\n".join(lines)


def write_rows(rows, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, indent=2) + "\n")
        return
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["file", "p_covid", "label"])
        writer.writeheader()
        writer.writerows(rows)


def write_gradcam_overlays(checkpoint, paths, out_dir, device: str = "cpu", target_class: int = 1) -> list[Path]:
    """One PNG per image in out_dir: the slice and its Grad-CAM overlay for the COVID logit
    (``covidct.gradcam``), titled with P(COVID) and the predicted label. -> the written paths."""
    from .gradcam import frame_boxes_of, gradcam
    from .preprocess import normalize, read_gray
    from .viz import plot_gradcam_overlay

    import minicnn as mc

    model, meta = load_checkpoint(checkpoint, device)
    preprocess = Preprocess.from_dict(meta["preprocess"])
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    threshold = float(meta.get("threshold", 0.5))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for path in map(Path, paths):
        image = load_image(path, preprocess)
        x = mc.to_device(normalize(image[None], mean, std), device)
        heatmap, logits = gradcam(model, x, target_class=target_class, return_logits=True,
                                  features=texture_inputs(model, [path]),
                                  boxes=frame_boxes_of(model, preprocess, [read_gray(path)]))
        shifted = np.exp(logits[0] - logits[0].max())
        p_covid = float(shifted[1] / shifted.sum())
        name, k = f"{path.stem}_gradcam.png", 1
        while name in used:                              # same file name in two folders
            k += 1
            name = f"{path.stem}_gradcam_{k}.png"
        used.add(name)
        title = (f"{path.name}: P(COVID) {p_covid:.3f} -> {CLASS_NAMES[int(p_covid >= threshold)]}\n"
                 f"Grad-CAM for the {CLASS_NAMES[target_class]} logit")
        written.append(plot_gradcam_overlay(image, heatmap[0], out_dir / name, title=title))
    return written
