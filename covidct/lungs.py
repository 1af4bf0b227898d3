"""Lung fields of a CT slice: a classical mask, a plausibility check, and the crop.

    lung_mask(gray)                  -> bool (H, W): dark regions enclosed by the body
    find_lungs(gray)                 -> LungFields(mask, box, found)
    crop_box(lungs, shape, margin)   -> (top, bottom, left, right) of the lungs' box (+ margin)
    crop_to_lungs(gray, lungs, ...)  -> the slice cut to that box, optionally masked

Why: a classifier trained on whole COVID-CT slices reads the body outline, the
scanner table, text from paper figures and the black bands that aspect-keeping
resizing adds (Grad-CAM put 13.5 % of its heat inside the lungs). Cutting each
slice to its lung fields before resizing leaves the network little else to read.

The mask (no learning, scipy.ndimage only):
  1. light smoothing, Otsu's threshold: dark = air or lung;
  2. air connected to the image border (through clearly dark pixels) is the air
     around the body: removed;
  3. opening (drops specks), closing and hole filling (take in vessels and lesions
     enclosed by lung);
  4. the two largest remaining components, each >= ``min_fraction`` of the image.

``find_lungs`` then judges the mask: it is implausible when it covers less than
``MIN_AREA`` or more than ``MAX_AREA`` of the slice (cropped one-lung slices whose
lung touches the border, photos of screens, slices without a dark outline). Then
``found`` is False and the crop falls back to the whole slice; the loader counts
these fallbacks. About 1 slice in 12 of COVID-CT needs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import CovidCTError

__all__ = ["MIN_AREA", "MAX_AREA", "LungFields", "otsu_threshold", "lung_mask", "find_lungs", "crop_box",
           "crop_to_lungs"]

LUNGS_VERSION = 1                        # bump when the mask changes (invalidates cached crops)
MIN_AREA, MAX_AREA = 0.04, 0.75          # plausible share of the slice covered by the lung mask
AIR_SHARE = 0.3                          # "clearly air" (see lung_mask)
WORK_SIZE = 256                          # the mask is computed with the longer side at most this


def otsu_threshold(values, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of a histogram."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(counts)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(counts * centers)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[1:][np.argmax(between[:-1])]) if len(between) > 1 else lo


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a bool (H, W) mask (pixels whose centres lie inside it)."""
    from scipy.spatial import ConvexHull, QhullError

    points = np.argwhere(mask)
    try:
        hull = ConvexHull(points)
    except (QhullError, ValueError):                  # too few or collinear points
        return mask.copy()
    grid = np.indices(mask.shape).reshape(2, -1).T
    # inside when every facet's plane equation a.x + b <= 0 (small tolerance for the edge)
    inside = (grid @ hull.equations[:, :2].T + hull.equations[:, 2]).max(axis=1) <= 0.5
    return inside.reshape(mask.shape)


def lung_mask(image, threshold: float | None = None, min_fraction: float = 0.01) -> np.ndarray:
    """A lung-field mask of one axial CT slice (H, W) in [0, 1] -> bool (H, W) (steps in the module docstring).

    Limits: a heuristic, not a segmentation model. It misses lung that touches the
    image border (tightly cropped slices), dense consolidation on the lung edge
    (bright like the chest wall, so outside a dark region and often not enclosed),
    and returns the trachea or bowel gas when a lung is missing or merged; on a
    slice without a dark body outline it can be empty or wrong: ``find_lungs``
    judges the result.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise CovidCTError(f"lung_mask: expected one (H, W) slice, got shape {image.shape}")
    size = min(image.shape)
    smooth = ndimage.gaussian_filter(image, sigma=max(0.5, size / 256))
    cut = otsu_threshold(smooth) if threshold is None else float(threshold)
    dark = smooth < cut
    radius = max(1, round(size / 64))

    # Outside air: flood-filled from the image border through very dark pixels (air: within
    # AIR_SHARE of the way from the border's dark level up to the threshold; the lung is
    # grayer), grown by a pixel or two. A chest wall thinned by smoothing then does not let
    # the flood into the lungs, and a gray page background around a figure still floods.
    edge = np.concatenate([smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1]])
    air = float(np.median(edge[edge < cut])) if np.any(edge < cut) else 0.0
    very_dark = smooth < air + AIR_SHARE * (cut - air)
    labels, count = ndimage.label(very_dark)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = ndimage.binary_dilation(np.isin(labels, border[border > 0]), structure=_disk(radius))
    inside = dark & ~outside
    inside = ndimage.binary_opening(inside, structure=_disk(radius))

    labels, count = ndimage.label(inside)
    if count == 0:
        return np.zeros(image.shape, bool)
    sizes = ndimage.sum(inside, labels, index=np.arange(1, count + 1))
    keep = 1 + np.flatnonzero(sizes >= max(min_fraction * image.size, 0.15 * sizes.max()))
    if len(keep) == 0:
        return np.zeros(image.shape, bool)
    lungs = np.isin(labels, keep)
    # Take in vessels and lesions (a lesion can cut a lung in pieces): each side of the midline
    # becomes the convex hull of its pieces.
    midline = np.argwhere(lungs)[:, 1].mean()
    centres = ndimage.center_of_mass(lungs, labels, keep)
    closed = np.zeros_like(lungs)
    for side in (True, False):
        pieces = [k for k, (_, x) in zip(keep, centres) if (x < midline) == side]
        if pieces:
            closed |= _convex_hull(np.isin(labels, pieces))
    return closed


@dataclass
class LungFields:
    """mask: bool (H, W) at the slice's resolution; box: (top, bottom, left, right), bottom/right
    exclusive; found: False when the mask was implausible (then box is the whole slice)."""
    mask: np.ndarray
    box: tuple[int, int, int, int]
    found: bool


def find_lungs(gray) -> LungFields:
    """The lung fields of a (H, W) slice in [0, 1]; the mask is computed on a copy whose longer
    side is at most WORK_SIZE px and scaled back (cheap on 1600 px figures, same answer)."""
    gray = np.asarray(gray, dtype=np.float32)
    h, w = gray.shape
    scale = min(1.0, WORK_SIZE / max(h, w))
    if scale < 1.0:
        small = ndimage.zoom(gray, (max(1, round(h * scale)) / h, max(1, round(w * scale)) / w), order=1)
    else:
        small = gray
    mask = lung_mask(small)
    area = mask.mean() if mask.size else 0.0
    if not MIN_AREA <= area <= MAX_AREA:
        return LungFields(np.ones((h, w), bool), (0, h, 0, w), False)
    if small.shape != (h, w):                              # back to full size (nearest neighbour)
        rows = np.minimum((np.arange(h) * small.shape[0]) // h, small.shape[0] - 1)
        cols = np.minimum((np.arange(w) * small.shape[1]) // w, small.shape[1] - 1)
        mask = mask[rows[:, None], cols[None, :]]
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return LungFields(mask, (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1), True)


def crop_box(lungs: LungFields, shape, margin: float = 0.08) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of what crop_to_lungs keeps of a slice of this (H, W) shape: the lungs'
    box widened by ``margin`` x its size on each side, clipped to the slice (the whole slice for a
    fallback)."""
    h, w = shape
    if not lungs.found:
        return 0, h, 0, w
    top, bottom, left, right = lungs.box
    pad_y, pad_x = round(margin * (bottom - top)), round(margin * (right - left))
    return max(0, top - pad_y), min(h, bottom + pad_y), max(0, left - pad_x), min(w, right + pad_x)


def crop_to_lungs(gray, lungs: LungFields, margin: float = 0.08, blank_outside: bool = False) -> np.ndarray:
    """Cut a (H, W) slice to the lungs' box, widened by ``margin`` x the box's size on each side
    (clipped to the slice). blank_outside: also set everything outside the (margin-dilated)
    mask to 0 (air), so only lung texture remains. A fallback (found False) returns the slice."""
    gray = np.asarray(gray, dtype=np.float32)
    if not lungs.found:
        return gray
    top, bottom, left, right = crop_box(lungs, gray.shape, margin)
    crop = gray[top:bottom, left:right]
    if blank_outside:
        mask = lungs.mask[top:bottom, left:right]
        grow = max(1, round(margin * min(bottom - top, right - left) / 2))
        mask = ndimage.binary_dilation(mask, structure=_disk(min(grow, 16)))
        crop = np.where(mask, crop, np.float32(0))
    return np.ascontiguousarray(crop, dtype=np.float32)
