"""Pictures of what the network does, and a check for shortcut learning.

    plot_filters(model, path)                                  first-layer filters
    plot_feature_maps(model, image, path, mean=, std=)         one slice after each conv / pool
    plot_hand_kernels(image, path)                             the 2020 report's edge and sharpen kernels
    plot_gradcam_grid(images, heatmaps, labels, probs, path, threshold)
    plot_gradcam_overlay(image, heatmap, path, title)          one slice, for ``covidct predict --gradcam``
    gradcam_grid(checkpoint, data_root, split, path, n=16)     the grid of correct and wrong predictions
    shortcut_check(checkpoint, data_root, split, out_dir)      shortcut.json + shortcut.md -> dict
    cv_gradcam(run_dir)                                        Grad-CAM in the lungs of a cv run's held-out slices

Every plot function writes one PNG (matplotlib, Agg backend), closes its figure
and returns the path. See docs/visualize.md.
"""
from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import minicnn as mc  # noqa: E402

from . import CLASS_NAMES, COVID  # noqa: E402
from .errors import CovidCTError  # noqa: E402
from .gradcam import DISTANCE_BANDS, feature_maps, frame_boxes_of, gradcam, mass_by_distance, mass_inside  # noqa: E402

__all__ = ["HAND_KERNELS", "hand_kernel_conv", "apply_hand_kernels", "plot_filters", "plot_feature_maps",
           "plot_hand_kernels", "plot_gradcam_grid", "plot_gradcam_overlay", "select_examples", "gradcam_grid",
           "reencode", "shortcut_check", "cv_gradcam"]

DPI = 100

# The hand-made 3x3 kernels of the 2020 report.
HAND_KERNELS = {
    "edge detection": np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], np.float32),
    "sharpen": np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], np.float32),
}


def _save(fig, path, palette: bool = False) -> Path:
    """Write the figure as PNG and close it. palette=True: 256-color palette PNG (photos with
    heatmap overlays compress 3-4x better that way; the loss is invisible)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not palette:
        fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight")
    else:
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=DPI, format="png", bbox_inches="tight")
        with Image.open(buffer) as image:
            image.convert("RGB").quantize(256).save(path, format="PNG", optimize=True)
    plt.close(fig)
    return path


def _as_slice(image) -> np.ndarray:
    """(H, W), (1, H, W) or (1, 1, H, W) -> float32 (H, W); a multi-view input (V, H, W) -> its first
    view (the whole slice, in whose frame Grad-CAM is drawn)."""
    image = np.asarray(mc.as_numpy(image), dtype=np.float32)
    while image.ndim > 2 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 3:
        image = image[0]
    if image.ndim != 2:
        raise CovidCTError(f"expected one grayscale slice (H, W), got shape {image.shape}")
    return image


def _first_conv(model) -> mc.Conv2d:
    for layer in model.modules():
        if isinstance(layer, mc.Conv2d):
            return layer
    raise CovidCTError(f"{type(model).__name__} has no Conv2d layer")


# ------------------------------------------------------------------ hand-made kernels
def hand_kernel_conv() -> mc.Conv2d:
    """A minicnn Conv2d(1 -> 2, 3x3, padding 1) whose weights are set by hand to HAND_KERNELS."""
    conv = mc.Conv2d(1, len(HAND_KERNELS), 3, padding=1)
    conv.weight.data = np.stack(list(HAND_KERNELS.values()))[:, None].astype(np.float32)   # (2, 1, 3, 3)
    conv.bias.data = np.zeros(len(HAND_KERNELS), np.float32)
    return conv.eval()


def apply_hand_kernels(image) -> dict[str, np.ndarray]:
    """One slice (H, W) -> {kernel name: response (H, W)} computed by minicnn's Conv2d (zero padding)."""
    image = _as_slice(image)
    out = hand_kernel_conv()(image[None, None])
    return {name: out[0, k] for k, name in enumerate(HAND_KERNELS)}


def plot_hand_kernels(image, path) -> Path:
    """The slice, each kernel, and its response (edge: |response|; sharpen: clipped to [0, 1])."""
    image = _as_slice(image)
    responses = apply_hand_kernels(image)
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.2), gridspec_kw={"height_ratios": [1, 3]})
    axes[0, 0].axis("off")
    axes[0, 0].text(0.5, 0.5, "minicnn Conv2d\n1 -> 2 channels, 3x3\nweights set by hand",
                    ha="center", va="center", fontsize=10)
    for ax, (name, kernel) in zip(axes[0, 1:], HAND_KERNELS.items()):
        ax.imshow(kernel, cmap="coolwarm", vmin=-8, vmax=8)
        for (i, j), value in np.ndenumerate(kernel):
            ax.text(j, i, f"{value:g}", ha="center", va="center", fontsize=10)
        ax.set_title(f"{name} kernel", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[1, 0].set_title("input slice")
    edge = np.abs(responses["edge detection"])
    axes[1, 1].imshow(edge, cmap="gray", vmin=0, vmax=max(float(np.percentile(edge, 99.5)), 1e-6))
    axes[1, 1].set_title("edge detection |response|")
    axes[1, 2].imshow(np.clip(responses["sharpen"], 0, 1), cmap="gray", vmin=0, vmax=1)
    axes[1, 2].set_title("sharpen (clipped to [0, 1])")
    for ax in axes[1]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------ filters and feature maps
def plot_filters(model, path, max_filters: int = 64) -> Path:
    """The first Conv2d's filters (input channel 0), one panel each, on a shared symmetric color scale."""
    conv = _first_conv(model)
    weights = mc.as_numpy(conv.weight.data)[:max_filters, 0]                # (F, kh, kw)
    count = len(weights)
    cols = min(8, count)
    rows = math.ceil(count / cols)
    limit = float(np.abs(weights).max()) or 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.6), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < count:
            image = ax.imshow(weights[k], cmap="coolwarm", vmin=-limit, vmax=limit)
            ax.set_title(str(k), fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(f"first-layer filters: Conv2d {conv.in_channels} -> {conv.out_channels}, "
                 f"{conv.kernel_size[0]}x{conv.kernel_size[1]}, stride {conv.stride[0]}", fontsize=10)
    return _save(fig, path)


def plot_feature_maps(model, image, path, mean: float = 0.0, std: float = 1.0, channels: int = 8) -> Path:
    """One slice (H, W) in [0, 1] and the first ``channels`` channels after every conv and pool layer.

    mean, std: the checkpoint's normalization (the slice is normalized as in training).
    """
    image = _as_slice(image)
    x = ((image - np.float32(mean)) / np.float32(std))[None, None].astype(np.float32)
    maps = [(name, a[0]) for name, a in feature_maps(model, x) if a.shape[2] * a.shape[3] > 1]
    cols = channels
    fig, axes = plt.subplots(len(maps) + 1, cols, figsize=(1.35 * cols, 1.45 * (len(maps) + 1)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title(f"input {image.shape[0]}x{image.shape[1]}", fontsize=8)
    for row, (name, activation) in enumerate(maps, start=1):
        for k in range(min(cols, activation.shape[0])):
            axes[row, k].imshow(activation[k], cmap="viridis")
            if k == 0:
                axes[row, k].set_title(f"{name} {activation.shape[0]}x{activation.shape[1]}x{activation.shape[2]}",
                                       fontsize=7, loc="left")
    fig.suptitle(f"feature maps (first {cols} channels of each layer; colors scaled per map)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------ Grad-CAM pictures
def _overlay(ax, image, heatmap, alpha: float = 0.45):
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.imshow(heatmap, cmap="jet", vmin=0, vmax=1, alpha=alpha)
    ax.axis("off")


def plot_gradcam_grid(images, heatmaps, labels, probs, path, threshold: float = 0.5, cols: int = 4,
                      title: str | None = None) -> Path:
    """Grad-CAM overlays; each title: true label, P(COVID), correct / WRONG (green / red)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4:
        images = images[:, 0]
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=np.float64)
    count = len(images)
    if not count == len(heatmaps) == len(labels) == len(probs):
        raise CovidCTError(f"plot_gradcam_grid: {count} images, {len(heatmaps)} heatmaps, "
                           f"{len(labels)} labels and {len(probs)} probabilities; expected the same number")
    cols = max(1, min(cols, count))
    rows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.55 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(count):
        ax = axes.flat[k]
        _overlay(ax, images[k], heatmaps[k])
        correct = int(probs[k] >= threshold) == labels[k]
        ax.set_title(f"true {CLASS_NAMES[labels[k]]}\nP(COVID) {probs[k]:.2f}  {'correct' if correct else 'WRONG'}",
                     fontsize=8, color="darkgreen" if correct else "red")
    fig.suptitle(title or f"Grad-CAM for the COVID logit (threshold {threshold:.3g})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, palette=True)


def plot_gradcam_overlay(image, heatmap, path, title: str = "") -> Path:
    """One slice: the slice and its Grad-CAM overlay side by side."""
    image = _as_slice(image)
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.3))
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].axis("off")
    _overlay(axes[1], image, _as_slice(heatmap))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, palette=True)


def select_examples(labels, probs, threshold: float, n: int = 16, seed: int = 0) -> np.ndarray:
    """Indices of up to n examples: half correct, half wrong predictions (topped up from the
    other group when one is short), each half split between the classes, drawn at random with ``seed``."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    correct = (probs >= threshold).astype(int) == labels

    def draw(pool, k):
        by_class = [rng.permutation(pool[labels[pool] == c]).tolist() for c in (COVID, 1 - COVID)]
        chosen = []
        while len(chosen) < k and any(by_class):
            for group in by_class:
                if group and len(chosen) < k:
                    chosen.append(group.pop(0))
        return chosen

    wrong_pool, right_pool = np.flatnonzero(~correct), np.flatnonzero(correct)
    wrong = draw(wrong_pool, min(n // 2, len(wrong_pool)))
    right = draw(right_pool, min(n - len(wrong), len(right_pool)))
    if len(wrong) + len(right) < n:
        wrong += [i for i in draw(wrong_pool, n - len(right)) if i not in wrong][:n - len(right) - len(wrong)]
    return np.array(right + wrong, dtype=np.int64)


def _load_split(checkpoint, data_root, split, cache_dir=None, device="cpu"):
    from .checkpoint import load_checkpoint
    from .data import read_dataset
    from .evaluate import predict_proba
    from .preprocess import Preprocess, load_images
    from .texture import texture_inputs

    model, meta = load_checkpoint(checkpoint, device)
    preprocess = Preprocess.from_dict(meta["preprocess"])
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    dataset = read_dataset(data_root, split=split)
    images, labels, paths = load_images(dataset, preprocess, cache_dir=cache_dir)
    probs = predict_proba(model, images, mean, std, device=device, features=texture_inputs(model, paths))
    return model, meta, images, labels, paths, probs


def _normalized(images, meta, device="cpu"):
    from .preprocess import normalize
    return mc.to_device(normalize(images, meta["normalization"]["mean"], meta["normalization"]["std"]), device)


def gradcam_grid(checkpoint, data_root, split: str = "val", path="gradcam_grid.png", n: int = 16,
                 cache_dir=None, seed: int = 0, device: str = "cpu") -> Path:
    """Grad-CAM (COVID logit) grid of n slices of a split: half correct, half wrong predictions."""
    from .preprocess import Preprocess, read_gray

    model, meta, images, labels, paths, probs = _load_split(checkpoint, data_root, split, cache_dir, device)
    threshold = float(meta.get("threshold", 0.5))
    chosen = select_examples(labels, probs, threshold, n, seed)
    boxes = frame_boxes_of(model, Preprocess.from_dict(meta["preprocess"]), (read_gray(paths[i]) for i in chosen))
    heatmaps = gradcam(model, _normalized(images[chosen], meta, device), target_class=COVID, boxes=boxes)
    wrong = int(np.sum((probs[chosen] >= threshold).astype(int) != labels[chosen]))
    title = (f"Grad-CAM for the COVID logit, {split} split: {len(chosen) - wrong} correct, {wrong} wrong "
             f"(threshold {threshold:.3g})")
    return plot_gradcam_grid(images[chosen], heatmaps, labels[chosen], probs[chosen], path, threshold, title=title)


# ------------------------------------------------------------------ shortcut check
def reencode(path, fmt: str, quality: int = 75) -> bytes:
    """The file's image re-encoded as "JPEG" (given quality) or "PNG", keeping what covidct's
    decoding sees: transparency is composited onto black first (JPEG has no alpha channel)."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("P", "PA", "RGBa", "La"):
            image = image.convert("RGBA")
        if image.mode in ("LA", "RGBA"):                # premultiply: gray * alpha, as to_gray does
            base = "L" if image.mode == "LA" else "RGB"
            black = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(black, image.convert("RGBA")).convert(base)
        if fmt.upper() == "JPEG" and image.mode not in ("L", "RGB", "CMYK"):
            image = image.convert("RGB")
        if fmt.upper() == "PNG" and image.mode == "CMYK":
            image = image.convert("RGB")
        buffer = io.BytesIO()
        if fmt.upper() == "JPEG":
            image.save(buffer, format="JPEG", quality=quality)
        else:
            image.save(buffer, format="PNG")
    return buffer.getvalue()


def _file_format(path) -> str:
    try:
        with Image.open(path) as image:
            return image.format or "unknown"
    except OSError:
        return "unreadable"


def _metrics(labels, probs, threshold):
    from .metrics import classification_metrics
    m = classification_metrics(labels, probs, threshold)
    return {key: (None if isinstance(m[key], float) and not np.isfinite(m[key]) else float(m[key]))
            for key in ("accuracy", "auc", "sensitivity", "specificity", "balanced_accuracy")}


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def shortcut_check(checkpoint, data_root, split: str = "val", out_dir="shortcut", cache_dir=None,
                   cam_target: str = "predicted", jpeg_quality: int = 75, device: str = "cpu") -> dict:
    """Two checks that the classifier looks at the lungs and not at the file:

    (a) Grad-CAM mass inside vs outside the lung mask (``covidct.lungs`` on the whole slice,
        cut and resized as the model input is: ``preprocess.input_lung_mask``), per class
        and overall; next to it the mask's share of the image, i.e. what a heatmap spread
        evenly would give, and the heat by bands of distance from the mask (``mass_by_distance``).
        Slices without a plausible mask are left out (counted).
    (b) accuracy / AUC when every image is re-encoded in the other class's file format
        (COVID -> JPEG quality 75, non-COVID -> PNG), then decoded with the same
        preprocessing, vs the original files.

    cam_target: "predicted" (each image's predicted class) or "covid" (the COVID logit).
    Writes out_dir/shortcut.json and out_dir/shortcut.md; returns the dict.
    """
    from .evaluate import predict_proba
    from .preprocess import Preprocess, input_lung_mask, load_image, read_gray
    from .texture import texture_inputs

    if cam_target not in ("predicted", "covid"):
        raise CovidCTError(f"cam_target must be 'predicted' or 'covid', got {cam_target!r}")
    model, meta, images, labels, paths, probs = _load_split(checkpoint, data_root, split, cache_dir, device)
    threshold = float(meta.get("threshold", 0.5))
    preprocess = Preprocess.from_dict(meta["preprocess"])
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    predicted = (probs >= threshold).astype(np.int64)

    # (a) Grad-CAM mass inside the lung mask.
    targets = predicted if cam_target == "predicted" else np.full(len(labels), COVID)
    grays = [read_gray(path) for path in paths]                  # each whole slice, read once
    heatmaps = gradcam(model, _normalized(images, meta, device), target_class=targets,
                       boxes=frame_boxes_of(model, preprocess, grays))
    found = [input_lung_mask(gray, preprocess) for gray in grays]
    usable = np.array([mask is not None for mask in found])   # implausible masks are left out
    masks = np.stack([mask if mask is not None else np.zeros(images.shape[2:], bool) for mask in found])
    area = masks.mean(axis=(1, 2))
    bands = [mass_by_distance(h, m) for h, m, ok in zip(heatmaps, masks, usable) if ok]   # (heat, area) per band
    inside = np.full(len(labels), np.nan)
    inside[usable] = [heat[0] for heat, _ in bands]                          # band 0: inside the mask

    def cam_summary(select):
        share = inside[select]
        return {"n": int(select.sum()), "n_used": int(np.isfinite(share).sum()),
                "mass_inside_lungs": _nanmean(share),
                "mass_outside_lungs": None if _nanmean(share) is None else 1 - _nanmean(share),
                "lung_mask_area": _nanmean(np.where(usable, area, np.nan)[select]),
                "median_mass_inside": float(np.nanmedian(share)) if np.isfinite(share).any() else None}

    every = np.ones(len(labels), bool)
    cam = {"target": cam_target, "overall": cam_summary(every),
           CLASS_NAMES[COVID]: cam_summary(labels == COVID), CLASS_NAMES[1 - COVID]: cam_summary(labels != COVID),
           "correct": cam_summary(predicted == labels), "wrong": cam_summary(predicted != labels),
           "masks_failed": int((~usable).sum()), "zero_heatmaps": int((heatmaps.reshape(len(labels), -1).max(1) == 0).sum())}
    if bands:                                 # where the heat lies: inside, then bands of distance from the lungs
        heat = np.array([h for h, _ in bands])
        cam["by_distance"] = {"edges_px": list(DISTANCE_BANDS),
                              "heat": [_nanmean(column) for column in heat.T],
                              "area": [float(a) for a in np.mean([a for _, a in bands], axis=0)]}

    # (b) the same images, each in the other class's file format.
    target_format = {COVID: "JPEG", 1 - COVID: "PNG"}
    formats = {CLASS_NAMES[c]: {"before": {}, "after": {}, "to": target_format[c]} for c in (COVID, 1 - COVID)}
    swapped, original_formats = [], []
    with tempfile.TemporaryDirectory(prefix="covidct-shortcut-") as tmp:
        for k, (path, label) in enumerate(zip(paths, labels)):
            fmt = target_format[int(label)]
            entry = formats[CLASS_NAMES[int(label)]]
            before = _file_format(path)
            original_formats.append(before)
            entry["before"][before] = entry["before"].get(before, 0) + 1
            new_path = Path(tmp) / f"{k:05d}.{'jpg' if fmt == 'JPEG' else 'png'}"
            new_path.write_bytes(reencode(path, fmt, jpeg_quality))
            after = _file_format(new_path)
            entry["after"][after] = entry["after"].get(after, 0) + 1
            swapped.append(load_image(new_path, preprocess))
        swapped_features = texture_inputs(model, sorted(Path(tmp).iterdir()))   # 00000.png, 00001.jpg, ...
    swapped_probs = predict_proba(model, np.stack(swapped), mean, std, device=device, features=swapped_features)
    swapped_pred = (swapped_probs >= threshold).astype(np.int64)
    pixel_change = float(np.abs(np.stack(swapped) - images).mean())
    reencoded = {
        "jpeg_quality": jpeg_quality, "formats": formats,
        "original": _metrics(labels, probs, threshold), "reencoded": _metrics(labels, swapped_probs, threshold),
        "mean_abs_change_p_covid": float(np.abs(swapped_probs - probs).mean()),
        "mean_change_p_covid": {CLASS_NAMES[c]: float((swapped_probs - probs)[labels == c].mean())
                                for c in (COVID, 1 - COVID) if np.any(labels == c)},
        "predictions_flipped": int((swapped_pred != predicted).sum()),
        "mean_abs_pixel_change": pixel_change,
    }
    # The file's real format (from its content, not its name) per class, before the swap.
    by_format = {}
    original_formats = np.array(original_formats)
    for c in (COVID, 1 - COVID):
        for fmt in sorted(set(original_formats[labels == c])):
            select = (labels == c) & (original_formats == fmt)
            by_format[f"{CLASS_NAMES[c]} {fmt}"] = {
                "n": int(select.sum()), "mean_p_covid": float(probs[select].mean()),
                "accuracy": float((predicted[select] == c).mean()),
                "mean_p_covid_reencoded": float(swapped_probs[select].mean()),
                "accuracy_reencoded": float((swapped_pred[select] == c).mean())}
    reencoded["by_original_format"] = by_format
    result = {"checkpoint": str(checkpoint), "data": str(data_root), "split": split, "n": int(len(labels)),
              "threshold": threshold, "preprocess": meta["preprocess"], "gradcam_in_lungs": cam,
              "format_swap": reencoded}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shortcut.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "shortcut.md").write_text(shortcut_markdown(result))
    return result


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def shortcut_markdown(result: dict) -> str:
    """The short human-readable report of ``shortcut_check``."""
    cam, swap = result["gradcam_in_lungs"], result["format_swap"]
    lines = [f"# Shortcut check: {result['split']} split ({result['n']} images)", "",
             f"Checkpoint `{result['checkpoint']}`, data `{result['data']}`, threshold {result['threshold']:.3g}.", "",
             f"## (a) Grad-CAM mass inside the lung mask (target: {cam['target']} class)", "",
             "| group | images | used | mass inside lungs | lung-mask area (uniform baseline) |",
             "|---|---|---|---|---|"]
    for group in ("overall", CLASS_NAMES[COVID], CLASS_NAMES[1 - COVID], "correct", "wrong"):
        row = cam[group]
        lines.append(f"| {group} | {row['n']} | {row['n_used']} | {_pct(row['mass_inside_lungs'])} | "
                     f"{_pct(row['lung_mask_area'])} |")
    lines += ["", f"Lung mask failed (< 2% of the slice) on {cam['masks_failed']} images; "
              f"{cam['zero_heatmaps']} heatmaps were all zero. A share well above the mask's area means "
              "the evidence concentrates on the lungs; near or below it means it does not.", ""]
    if "by_distance" in cam:
        edges = cam["by_distance"]["edges_px"]
        names = ["inside the lungs", f"up to {edges[0]} px outside"] + \
            [f"{a}-{b} px outside" for a, b in zip(edges, edges[1:])] + [f"over {edges[-1]} px outside"]
        lines += ["Where the heat lies, by distance from the lung mask (pixels of the model's input; heat outside "
                  "that hugs the mask is evidence on the lungs' edge, the far bands are the body wall, table and "
                  "corners):", "", "| band | heat | area (uniform baseline) |", "|---|---|---|"]
        lines += [f"| {name} | {_pct(heat)} | {_pct(area)} |"
                  for name, heat, area in zip(names, cam["by_distance"]["heat"], cam["by_distance"]["area"])]
        lines.append("")
    lines += ["## (b) Every image re-encoded in the other class's format", "",
              f"COVID -> {swap['formats'][CLASS_NAMES[COVID]]['to']} (quality {swap['jpeg_quality']}), "
              f"non-COVID -> {swap['formats'][CLASS_NAMES[1 - COVID]]['to']}; same preprocessing.", "",
              "| files | accuracy | AUC | sensitivity | specificity |", "|---|---|---|---|---|"]
    for name in ("original", "reencoded"):
        m = swap[name]
        lines.append(f"| {name} | {_pct(m['accuracy'])} | {_num(m['auc'])} | {_pct(m['sensitivity'])} | "
                     f"{_pct(m['specificity'])} |")
    changes = ", ".join(f"{k} {v:+.3f}" for k, v in swap["mean_change_p_covid"].items())
    lines += ["", f"Mean |change| of P(COVID): {swap['mean_abs_change_p_covid']:.4f} (mean change: {changes}); "
              f"{swap['predictions_flipped']} of {result['n']} predictions flipped; mean |pixel change| after "
              f"preprocessing {swap['mean_abs_pixel_change']:.4f}. A large drop means the model used the file "
              "format (JPEG artefacts) rather than the lungs.", "",
              "By the file's real format (read from its content, not its name):", "",
              "| class, format | images | mean P(COVID) | accuracy | mean P(COVID) re-encoded | accuracy re-encoded |",
              "|---|---|---|---|---|---|"]
    for name, row in swap["by_original_format"].items():
        lines.append(f"| {name} | {row['n']} | {row['mean_p_covid']:.3f} | {_pct(row['accuracy'])} | "
                     f"{row['mean_p_covid_reencoded']:.3f} | {_pct(row['accuracy_reencoded'])} |")
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------ Grad-CAM of a cross-validation
def _fold_checkpoints(run: Path, repeat: int, fold: int) -> list[Path]:
    """The CNN checkpoints of one fold of a covidct cv run, r<R>-fold<F>[-...]/best.npz (texture models
    keep only their held-out predictions, so they have none), whole-slice members first: the first
    member's view is the frame the ensemble's heatmaps are drawn in (lung-crop members pasted into it)."""
    from .checkpoint import load_checkpoint

    name = f"r{repeat}-fold{fold}"
    checkpoints = sorted(folder / "best.npz" for folder in run.iterdir()
                         if (folder.name == name or folder.name.startswith(name + "-")) and (folder / "best.npz").is_file())
    return sorted(checkpoints, key=lambda path: load_checkpoint(path)[1]["preprocess"].get("lungs", "none") != "none")


def cv_gradcam(run_dir, cam_target: str = "predicted", device: str = "cpu", log=print) -> dict:
    """Grad-CAM mass inside the lung mask on every held-out slice of a finished ``covidct cv`` run.

    Each fold's CNNs are joined as one ensemble (with the run's mirror-image TTA) and explain the
    slices that fold held out, for the class the recipe predicts for them out of fold (oof.csv at
    cv.json's threshold; cam_target "covid": the COVID logit). The share is measured as in
    shortcut_check (a): the heat's mass inside covidct.lungs' mask in the model input's frame, lung-crop
    members pasted into their boxes, slices without a plausible mask left out. Each slice is explained
    by models that never trained on it, which a checkpoint's validation split cannot promise.
    Writes RUN/gradcam.json and RUN/gradcam.md; returns the dict."""
    import pandas as pd

    from .checkpoint import load_checkpoint
    from .ensemble import save_ensemble
    from .preprocess import Preprocess, input_lung_mask, load_image, read_gray

    if cam_target not in ("predicted", "covid"):
        raise CovidCTError(f"cam_target must be 'predicted' or 'covid', got {cam_target!r}")
    run = Path(run_dir)
    try:
        saved = json.loads((run / "cv.json").read_text())
        oof = pd.read_csv(run / "oof.csv")
        threshold, folds, repeats = saved["threshold"], int(saved["folds"]), int(saved["repeats"])
        tta = bool(saved.get("tta", False))                # runs from before TTA: none
    except (OSError, ValueError, KeyError, TypeError):
        raise CovidCTError(f"{run}: not a finished covidct cv run (expected its cv.json and oof.csv)") from None
    rows = []
    for repeat in range(repeats):
        for fold in range(folds):
            held_out = oof[oof[f"fold_r{repeat}"] == fold]
            checkpoints = _fold_checkpoints(run, repeat, fold)
            if not checkpoints:
                raise CovidCTError(f"{run}: no fold models r{repeat}-fold{fold}*/best.npz (a texture-only recipe "
                                   f"has no Grad-CAM)")
            with tempfile.TemporaryDirectory(prefix="covidct-cv-gradcam-") as tmp:
                model, meta = load_checkpoint(save_ensemble(Path(tmp) / "fold.npz", checkpoints, threshold, tta=tta),
                                              device)
            preprocess = Preprocess.from_dict(meta["preprocess"])
            paths, labels = list(held_out["file"]), held_out["label"].to_numpy(np.int64)
            predicted = np.where(held_out[f"p_covid_r{repeat}"].to_numpy() >= threshold, COVID, 1 - COVID)
            targets = predicted if cam_target == "predicted" else np.full(len(paths), COVID)
            images = np.stack([load_image(path, preprocess) for path in paths])
            grays = [read_gray(path) for path in paths]              # each whole slice, read once
            heatmaps = gradcam(model, _normalized(images, meta, device), target_class=targets,
                               boxes=frame_boxes_of(model, preprocess, grays))
            for path, gray, label, heatmap in zip(paths, grays, labels, heatmaps):
                mask = input_lung_mask(gray, preprocess)
                inside = np.nan if mask is None else mass_inside(heatmap, mask)    # nan: no mask, or no heat
                rows.append({"repeat": repeat, "fold": fold, "label": int(label), "file": path, "inside": inside,
                             "area": float(mask.mean()) if np.isfinite(inside) else np.nan,
                             "no_mask": mask is None})
            share = _nanmean([row["inside"] for row in rows[-len(paths):]])
            log(f"repeat {repeat + 1}/{repeats} fold {fold + 1}/{folds}: {len(checkpoints)} CNNs, {len(paths)} "
                f"held-out slices, heat inside the lungs {_pct(share)}")
    table = pd.DataFrame(rows)

    def summary(part):                 # used: slices with a plausible mask and some heat
        return {"n": int(len(part)), "n_used": int(part["inside"].notna().sum()),
                "masks_failed": int(part["no_mask"].sum()), "mass_inside_lungs": _nanmean(part["inside"]),
                "lung_mask_area": _nanmean(part["area"])}

    result = {"run": str(run), "target": cam_target, "threshold": float(threshold), "tta": bool(tta),
              "folds": [dict(repeat=int(r), fold=int(f), **summary(part)) for (r, f), part in table.groupby(["repeat", "fold"])],
              "pooled": summary(table), CLASS_NAMES[COVID]: summary(table[table["label"] == COVID]),
              CLASS_NAMES[1 - COVID]: summary(table[table["label"] != COVID])}
    result["mean_over_folds"] = _nanmean([row["mass_inside_lungs"] for row in result["folds"]
                                          if row["mass_inside_lungs"] is not None])
    (run / "gradcam.json").write_text(json.dumps(result, indent=2) + "\n")
    (run / "gradcam.md").write_text(cv_gradcam_markdown(result))
    return result


def cv_gradcam_markdown(result: dict) -> str:
    """The table of ``cv_gradcam``: one row per fold, then the pooled slices and each class."""
    lines = [f"# Grad-CAM in the lungs: held-out slices of {result['run']}", "",
             f"Each fold's CNNs explain the slices it held out (target: {result['target']} class, threshold "
             f"{result['threshold']:.3g}, mirror-image TTA {'on' if result['tta'] else 'off'}).", "",
             "| held-out slices | slices | used | heat inside the lungs | the lungs' area (an even spread) |",
             "|---|---|---|---|---|"]
    rows = [(f"repeat {row['repeat'] + 1} fold {row['fold'] + 1}", row) for row in result["folds"]]
    rows += [("all, pooled", result["pooled"]), (CLASS_NAMES[COVID], result[CLASS_NAMES[COVID]]),
             (CLASS_NAMES[1 - COVID], result[CLASS_NAMES[1 - COVID]])]
    lines += [f"| {name} | {row['n']} | {row['n_used']} | {_pct(row['mass_inside_lungs'])} | "
              f"{_pct(row['lung_mask_area'])} |" for name, row in rows]
    pooled = result["pooled"]
    lines += ["", f"Mean over folds: {_pct(result['mean_over_folds'])}. Used: slices with a plausible lung mask "
              f"({pooled['n'] - pooled['masks_failed']} of {pooled['n']}) and a heatmap that is not all zero. A share "
              "well above the lungs' area means the evidence lies in the lungs.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ lung masks
def lung_sheet(data_root, split: str | None = "train", path="lungs.png", n: int = 24, seed: int = 0,
               cols: int = 6) -> tuple[Path, dict]:
    """A contact sheet of n slices with their lung mask (red) and crop box (yellow), so a person can
    check covidct.lungs on a dataset; slices that fall back to the whole slice are titled FALLBACK.
    -> (path, {"shown": n, "fallbacks": k})."""
    from .data import read_dataset
    from .lungs import find_lungs
    from .preprocess import read_gray

    dataset = read_dataset(data_root, split=split)
    if n < 1:
        raise CovidCTError(f"--n must be >= 1, got {n}")
    pick = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    rows = math.ceil(len(pick) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    fallbacks = 0
    for ax in axes.ravel():
        ax.axis("off")
    for ax, index in zip(axes.ravel(), pick):
        file = dataset.paths[index]
        gray = read_gray(file)
        lungs = find_lungs(gray)
        fallbacks += not lungs.found
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        if lungs.found:
            ax.contour(lungs.mask, [0.5], colors="red", linewidths=0.8)
            top, bottom, left, right = lungs.box
            ax.add_patch(plt.Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                                       edgecolor="yellow", linewidth=0.8))
        name = Path(file).name
        ax.set_title(f"{CLASS_NAMES[dataset.labels[index]]} {name[:16]}{'' if lungs.found else ' FALLBACK'}",
                     fontsize=7, color="black" if lungs.found else "red")
    fig.suptitle(f"lung masks (red) and crop boxes (yellow): {len(pick)} slices, {fallbacks} fallbacks", fontsize=10)
    return _save(fig, path), {"shown": len(pick), "fallbacks": fallbacks}
