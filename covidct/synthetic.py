"""A synthetic CT phantom: the built-in dataset that needs no download.

    make_slice(label, rng, size=128, difficulty=0.5)  -> float32 (size, size) in [0, 1]
    make_slices(n, seed=0, ...)                        -> images (n, 1, size, size), labels (n,)
    write_dataset(out_dir, n=600, seed=0, ...)         -> out_dir in the UCSD COVID-CT layout

Each slice is an axial chest CT drawn from random shapes (coordinates u, v in
[-1, 1], anterior at the top, patient's left on the image right):

    air (black) > body ellipse (soft tissue, darker fat rim) > two dark lungs with a
    heart notch > vessels (bright dots and short branches, denser near the hilum)
    and a few bronchi (dark lumen, bright wall) > aorta, spine, ribs, sternum,
    scanner table (bright) > correlated noise and a slight blur.

Label 1 (COVID) adds ground-glass opacities (hazy, patchy, vessels still visible)
and sometimes consolidations (dense), usually in both lungs, in the periphery
and posteriorly, of varying size and contrast. Both classes get benign
findings (small nodules, dependent posterior density, thin atelectasis bands,
faint patches) so that "any bright spot" is not the answer.

difficulty in [0, 1]: higher = fainter and fewer lesions, more benign confounders.

Every slice is a pure function of (seed, label, index), so write_dataset is
reproducible. Files are 8-bit grayscale PNGs for both classes: the real data's
format confound (PNG vs JPEG) is deliberately absent.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from covidct import COVID, NON_COVID
from covidct.errors import DataError

__all__ = ["DEFAULT_SIZE", "DEFAULT_N", "DEFAULT_DIFFICULTY", "GENERATOR_VERSION",
           "make_slice", "make_slices", "write_dataset"]

DEFAULT_SIZE = 128
DEFAULT_N = 600
DEFAULT_DIFFICULTY = 0.5
GENERATOR_VERSION = 1          # bump when the drawing changes (invalidates written datasets)

# Intensities in [0, 1], roughly a lung window: air 0, lung ~0.16, fat ~0.66, soft tissue ~0.78, bone 1.
AIR, LUNG, FAT, TISSUE, BLOOD, BONE = 0.0, 0.16, 0.66, 0.78, 0.84, 1.0


# ------------------------------------------------------------------ drawing helpers
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates u (left -> right), v (top -> bottom) in [-1, 1], each (size, size)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(t, t)
    return u, v


def _soft(inside: np.ndarray, width: float) -> np.ndarray:
    """Soft mask from a signed "inside" distance (> 0 inside): a linear ramp `width` wide."""
    return np.clip(0.5 + inside * np.float32(0.5 / max(width, 1e-6)), 0, 1).astype(np.float32, copy=False)


def _blobs(u, v, cx, cy, sx, sy, angle, amp) -> np.ndarray:
    """Sum of K rotated Gaussian blobs on the axis-aligned grid (u, v) -> (H, W).

    cx, cy: centres; sx, sy: standard deviations along / across `angle`; amp: peak
    values (all (K,) sequences). Each blob is evaluated only in a window of
    +-3.5 standard deviations around its centre, which keeps this fast.
    """
    out = np.zeros_like(u)
    u_axis, v_axis = u[0], v[:, 0]
    for x, y, a, b, t, h in zip(cx, cy, sx, sy, np.broadcast_to(angle, np.shape(cx)), amp):
        reach = 3.5 * max(a, b)
        j0, j1 = np.searchsorted(u_axis, [x - reach, x + reach])
        i0, i1 = np.searchsorted(v_axis, [y - reach, y + reach])
        if j0 >= j1 or i0 >= i1:
            continue
        du = u_axis[j0:j1][None, :] - np.float32(x)
        dv = v_axis[i0:i1][:, None] - np.float32(y)
        c, s = np.float32(np.cos(t)), np.float32(np.sin(t))
        along = (c * du + s * dv) / np.float32(a)
        across = (-s * du + c * dv) / np.float32(b)
        out[i0:i1, j0:j1] += np.float32(h) * np.exp(-0.5 * (along * along + across * across))
    return out


def _ellipse(u, v, cx, cy, ax, ay, px) -> np.ndarray:
    """Soft filled ellipse (1 inside, 0 outside), evaluated only in its bounding box."""
    out = np.zeros_like(u)
    j0, j1 = np.searchsorted(u[0], [cx - ax - 2 * px, cx + ax + 2 * px])
    i0, i1 = np.searchsorted(v[:, 0], [cy - ay - 2 * px, cy + ay + 2 * px])
    uu, vv = u[i0:i1, j0:j1], v[i0:i1, j0:j1]
    r = np.sqrt(((uu - np.float32(cx)) / np.float32(ax)) ** 2 + ((vv - np.float32(cy)) / np.float32(ay)) ** 2)
    out[i0:i1, j0:j1] = _soft((1 - r) * np.float32(min(ax, ay)), px)
    return out


def _smooth_noise(rng, size: int, sigma_px: float) -> np.ndarray:
    """Correlated noise with unit standard deviation, (size, size)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma_px)
    return field / (field.std() + 1e-8)


# ------------------------------------------------------------------ one slice
def make_slice(label: int, rng: np.random.Generator, size: int = DEFAULT_SIZE,
               difficulty: float = DEFAULT_DIFFICULTY, with_lung_mask: bool = False):
    """One synthetic axial CT slice -> float32 (size, size) in [0, 1]. label: 1 = COVID, 0 = not.

    with_lung_mask: also return the true lung fields, bool (size, size) (the same slice: drawing
    the mask uses no random numbers), to measure a lung segmentation against.
    """
    if label not in (COVID, NON_COVID):
        raise DataError(f"make_slice: label={label!r}, expected 1 (COVID) or 0 (non-COVID)")
    if not 0 <= difficulty <= 1:
        raise DataError(f"make_slice: difficulty={difficulty!r}, expected a number in [0, 1]")
    if size < 16:
        raise DataError(f"make_slice: size={size}, expected at least 16 pixels")
    px = 2.0 / size                                              # one pixel in (u, v) units
    u0, v0 = _grid(size)
    # Separate streams for the lesions and the scanner: with the same rng, a COVID and a
    # non-COVID slice share anatomy, benign findings and noise; only the lesions differ.
    lesion_rng = np.random.default_rng(rng.integers(0, 2 ** 63))
    scanner_rng = np.random.default_rng(rng.integers(0, 2 ** 63))

    # Patient pose: body centre, size and a small rotation, shared by all structures.
    cx0, cy0 = rng.uniform(-0.04, 0.04), rng.uniform(-0.08, 0.0)
    tilt = rng.uniform(-6, 6)                                    # degrees, applied at the end
    A, B = rng.uniform(0.84, 0.95), rng.uniform(0.56, 0.68)     # body half-width, half-height
    u, v = u0 - np.float32(cx0), v0 - np.float32(cy0)
    X, Y = u / A, v / B                                          # body-relative coordinates

    # Body: ellipse flattened at the back, darker fat rim, soft tissue inside.
    theta = np.arctan2(Y, X)
    wobble = 1 + 0.025 * np.cos(3 * theta + rng.uniform(0, 2 * np.pi)) + 0.02 * np.cos(5 * theta + rng.uniform(0, 6))
    r_body = np.sqrt(X ** 2 + (np.where(Y > 0, Y * 1.08, Y)) ** 2) / wobble
    body = _soft((1 - r_body) * B, px)
    fat_depth = rng.uniform(0.04, 0.1)
    tissue = TISSUE - (TISSUE - FAT) * _soft((r_body - (1 - fat_depth)) * B, 1.5 * px)
    image = body * tissue

    # Scanner table: a thin bright curved band under the back.
    table_v = B * 1.1 + 0.05 + 0.05 * (u / A) ** 2
    table = _soft((0.012 - np.abs(v - table_v)), px) * _soft(0.95 - np.abs(u), px)
    image = np.maximum(image, 0.5 * table)

    # Lungs: two irregular ellipses; heart, mediastinum and spine cut their medial side.
    lungs, lung_parts = np.zeros_like(u), []
    for side in (-1, 1):                                         # -1: image left (patient right)
        lx, ly = side * rng.uniform(0.45, 0.5) * A, rng.uniform(-0.1, 0.0) * B
        ax, ay = rng.uniform(0.36, 0.41) * A, rng.uniform(0.7, 0.8) * B
        lu, lv = (u - lx) / ax, (v - ly) / ay
        phi = np.arctan2(lv, lu * side)                          # 0 = lateral, +pi/2 = posterior
        radius = 1 + sum(rng.uniform(-0.04, 0.04) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
        rho = np.sqrt(lu ** 2 + lv ** 2)
        part = _soft((radius - rho) * min(ax, ay), px)
        lung_parts.append(dict(side=side, x=lx, y=ly, ax=ax, ay=ay, part=part))
        lungs = np.maximum(lungs, part)
    heart = _ellipse(u, v, rng.uniform(0.03, 0.1) * A, rng.uniform(-0.3, -0.15) * B,
                     rng.uniform(0.18, 0.3) * A, rng.uniform(0.3, 0.42) * B, px)
    mediastinum = _soft(rng.uniform(0.09, 0.13) * A - np.abs(u), px)
    spine_block = _ellipse(u, v, 0, 0.66 * B, 0.17 * A, 0.3 * B, px)
    lungs = lungs * (1 - np.maximum.reduce([heart, mediastinum, spine_block])) * body
    for p in lung_parts:
        p["part"] = p["part"] * lungs
    # Lung parenchyma: dark, a little denser at the back (gravity), faint texture.
    texture = _smooth_noise(rng, size, 1.5)                     # shared by parenchyma and lesions
    lung_value = LUNG + 0.04 * np.clip(Y, -1, 1) + 0.015 * texture
    image = image * (1 - lungs) + lungs * lung_value
    image = image * (1 - heart) + heart * BLOOD

    # Vessels: dots (cut across) and short segments (in plane), wider near the hilum.
    image = image + lungs * _vessels(u, v, lung_parts, rng, px)

    # Airways: trachea / main bronchus in the mediastinum, small bronchi near each hilum.
    trachea = _ellipse(u, v, rng.uniform(-0.03, 0.03) * A, rng.uniform(0.12, 0.25) * B,
                       rng.uniform(0.04, 0.06) * A, rng.uniform(0.05, 0.08) * B, px)
    image = image * (1 - trachea) + trachea * 0.02
    for p in lung_parts:
        for _ in range(int(rng.integers(1, 3))):
            bx = p["x"] - p["side"] * p["ax"] * rng.uniform(0.45, 0.7)
            by = p["y"] + p["ay"] * rng.uniform(-0.35, 0.1)
            radius = rng.uniform(1.2, 2.2) * px
            wall = _ellipse(u, v, bx, by, radius + 1.2 * px, radius + 1.2 * px, 0.5 * px) * p["part"]
            lumen = _ellipse(u, v, bx, by, radius, radius, 0.5 * px) * p["part"]
            image = image * (1 - wall) + wall * 0.55
            image = image * (1 - lumen) + lumen * 0.02

    # Aorta (patient's left = image right, beside the spine), spine, sternum, ribs.
    aorta = _ellipse(u, v, rng.uniform(0.1, 0.16) * A, rng.uniform(0.32, 0.42) * B, 0.09 * B, 0.09 * B, px)
    image = image * (1 - aorta) + aorta * BLOOD
    sy = rng.uniform(0.6, 0.66) * B
    vertebra = _ellipse(u, v, 0, sy, 0.1 * A, 0.13 * B, px)
    cortex = _soft(np.sqrt((u / (0.1 * A)) ** 2 + ((v - sy) / (0.13 * B)) ** 2) - 0.7, 0.1)
    image = image * (1 - vertebra) + vertebra * (BONE - 0.1 + 0.1 * cortex)
    canal = _ellipse(u, v, 0, sy + 0.22 * B, 0.05 * A, 0.07 * B, px)
    image = image * (1 - canal) + canal * 0.62
    posterior = _blobs(u, v, [-0.07 * A, 0.07 * A, 0.0], [sy + 0.3 * B] * 2 + [sy + 0.42 * B],
                       [0.035 * A, 0.035 * A, 0.018 * A], [0.03 * B, 0.03 * B, 0.07 * B], np.zeros(3), [0.3, 0.3, 0.3])
    image = image + body * posterior * (1 - lungs)
    sternum = _ellipse(u, v, 0, -0.92 * B, 0.07 * A, 0.045 * B, px)
    image = image * (1 - sternum) + sternum * BONE
    rib_x, rib_y, rib_angle = [], [], []
    for p in lung_parts:
        phi = np.linspace(-0.6 * np.pi, 0.75 * np.pi, int(rng.integers(5, 8))) + rng.uniform(-0.15, 0.15)
        rib_x += list(p["x"] + p["side"] * np.cos(phi) * (p["ax"] + 3 * px))
        rib_y += list(p["y"] + np.sin(phi) * (p["ay"] + 3 * px))
        rib_angle += list(np.arctan2(np.sin(phi) * p["ay"], p["side"] * np.cos(phi) * p["ax"]) + np.pi / 2)
    n_ribs = len(rib_x)
    ribs = _blobs(u, v, rib_x, rib_y, rng.uniform(2.5, 4, n_ribs) * px, rng.uniform(1.2, 1.8, n_ribs) * px,
                  np.array(rib_angle), rng.uniform(0.25, 0.35, n_ribs))
    image = image + ribs * (1 - lungs) * body

    # Findings. Both classes: benign ones, more of them when difficulty is high.
    texture = np.clip(0.65 + 0.35 * texture, 0, 1)
    findings = np.zeros_like(u)
    findings += _benign(u, v, lung_parts, rng, difficulty, px, texture)
    if label == COVID:
        findings += _covid_lesions(u, v, lung_parts, lesion_rng, difficulty, px, texture)
    image = image + findings * lungs

    # Scanner: patient tilt, slight blur, correlated noise, window jitter.
    image = ndimage.rotate(image, tilt, reshape=False, order=1, mode="constant", cval=0.0)
    image = ndimage.gaussian_filter(image, scanner_rng.uniform(0.4, 0.7) * size / 128)
    noise = _smooth_noise(scanner_rng, size, 0.7) * scanner_rng.uniform(0.012, 0.03)
    image = np.clip(image + noise, 0, 1) ** scanner_rng.uniform(0.8, 1.25)   # window: gamma, gain, offset
    image = image * scanner_rng.uniform(0.92, 1.05) + scanner_rng.uniform(-0.03, 0.03)
    image = np.clip(image, 0, 1).astype(np.float32)
    if with_lung_mask:
        return image, ndimage.rotate(lungs, tilt, reshape=False, order=1, mode="constant", cval=0.0) > 0.5
    return image


def _splat(u, v, x, y, weights) -> np.ndarray:
    """Add point weights at (x, y) to an (H, W) grid with bilinear spreading."""
    h, w = u.shape
    px = float(u[0, 1] - u[0, 0])
    fj, fi = (np.asarray(x) - u[0, 0]) / px, (np.asarray(y) - v[0, 0]) / px
    j0, i0 = np.floor(fj).astype(np.int64), np.floor(fi).astype(np.int64)
    dj, di = fj - j0, fi - i0
    grid = np.zeros(h * w)
    for oi, oj, share in ((0, 0, (1 - di) * (1 - dj)), (0, 1, (1 - di) * dj), (1, 0, di * (1 - dj)), (1, 1, di * dj)):
        ii, jj = i0 + oi, j0 + oj
        ok = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
        grid += np.bincount(ii[ok] * w + jj[ok], weights=(weights * share)[ok], minlength=h * w)
    return grid.reshape(h, w).astype(np.float32)


VESSEL_SIGMAS = (0.6, 0.9, 1.3)          # vessel radius classes, in pixels at size 128


def _vessels(u, v, lung_parts, rng, px) -> np.ndarray:
    """Vessel map (H, W): points and short radial segments splatted, then blurred per width class."""
    scale = 2.0 / (128 * px)                                      # pixels per pixel-at-128
    xs, ys, weights, classes = [], [], [], []
    for p in lung_parts:
        k = int(rng.integers(34, 48))
        rho = rng.uniform(0, 1, k) ** 0.7
        phi = rng.uniform(0, 2 * np.pi, k)
        x = p["x"] + p["side"] * rho * np.cos(phi) * p["ax"] * 0.95
        y = p["y"] + rho * np.sin(phi) * p["ay"] * 0.95
        hx, hy = p["x"] - p["side"] * 0.7 * p["ax"], p["y"] - 0.1 * p["ay"]     # hilum
        dist = np.hypot((x - hx) / p["ax"], (y - hy) / p["ay"]) + rng.uniform(-0.25, 0.25, k)
        width_class = 2 - np.digitize(dist, [0.6, 1.0])               # near the hilum: widest
        length = np.where(rng.random(k) < 0.5, rng.uniform(2, 6, k) * (1 + 0.5 * width_class), 0) * scale
        direction = np.arctan2(y - hy, x - hx)
        amp = rng.uniform(0.35, 0.55, k)
        sigma = np.array(VESSEL_SIGMAS)[width_class] * scale
        n_points = np.maximum(1, np.ceil(length / 0.5).astype(np.int64) + 1)
        owner = np.repeat(np.arange(k), n_points)
        step = np.arange(len(owner)) - np.repeat(np.cumsum(n_points) - n_points, n_points)
        t = np.where(n_points[owner] > 1, step / np.maximum(n_points[owner] - 1, 1) - 0.5, 0.0)
        xs.append(x[owner] + t * length[owner] * px * np.cos(direction[owner]))
        ys.append(y[owner] + t * length[owner] * px * np.sin(direction[owner]))
        spacing = length / np.maximum(n_points - 1, 1)
        weight = np.where(n_points > 1, amp * np.sqrt(2 * np.pi) * sigma * spacing, amp * 2 * np.pi * sigma ** 2)
        weights.append(weight[owner])
        classes.append(width_class[owner])
    xs, ys, weights, classes = map(np.concatenate, (xs, ys, weights, classes))
    out = np.zeros_like(u)
    for c, sigma in enumerate(VESSEL_SIGMAS):
        chosen = classes == c
        dots = _splat(u, v, xs[chosen], ys[chosen], weights[chosen])
        # The thinnest class relies on the bilinear splat and the final scanner blur.
        out += ndimage.gaussian_filter(dots, sigma * scale) if c > 0 else dots / np.float32(2 * np.pi * (sigma * scale) ** 2)
    return out


def _lung_points(p, rng, n, rho_range, phi_center, phi_spread):
    """n points inside lung p at relative radius rho and angle phi (0 = lateral, pi/2 = posterior)."""
    rho = rng.uniform(*rho_range, n)
    phi = phi_center + rng.uniform(-phi_spread, phi_spread, n)
    x = p["x"] + p["side"] * rho * np.cos(phi) * p["ax"]
    y = p["y"] + rho * np.sin(phi) * p["ay"]
    return x, y, phi


def _benign(u, v, lung_parts, rng, difficulty, px, texture) -> np.ndarray:
    """Small nodules, dependent density, atelectasis bands, faint patches (both classes)."""
    out = np.zeros_like(u)
    for p in lung_parts:
        hard = difficulty ** 2                                   # confounders grow fastest near 1
        n = rng.poisson(0.3 + 1.2 * hard)                        # nodules: small, round, bright
        if n:
            x, y, _ = _lung_points(p, rng, n, (0.1, 0.85), 0, np.pi)
            r = rng.uniform(1.2, 2.5, n) * px
            out += _blobs(u, v, x, y, r, r, np.zeros(n), rng.uniform(0.4, 0.6, n))
        if rng.random() < 0.15 + 0.45 * hard:                    # dependent (posterior) density
            lv = (v - p["y"]) / p["ay"]
            out += rng.uniform(0.05, 0.09 + 0.06 * hard) * np.clip((lv - 0.45) / 0.45, 0, 1) * p["part"]
        if rng.random() < 0.1 + 0.3 * hard:                      # thin atelectasis band
            x, y, phi = _lung_points(p, rng, 1, (0.5, 0.8), np.pi / 2, 0.8)
            out += _blobs(u, v, x, y, rng.uniform(5, 9, 1) * px, [0.9 * px], phi + np.pi / 2, [0.3])
        if rng.random() < 0.4 * hard:                            # faint, small patch
            x, y, _ = _lung_points(p, rng, 1, (0.3, 0.9), 0, np.pi)
            s = rng.uniform(2.5, 4, 1) * px
            out += _blobs(u, v, x, y, s, s * rng.uniform(0.6, 1, 1), rng.uniform(0, np.pi, 1),
                          rng.uniform(0.06, 0.12, 1)) * texture
    return out


def _covid_lesions(u, v, lung_parts, rng, difficulty, px, texture) -> np.ndarray:
    """Ground-glass opacities and consolidations: peripheral, posterior, usually bilateral, patchy."""
    out = np.zeros_like(u)
    n_total = max(1, int(round(rng.integers(3, 9) * (1 - 0.5 * difficulty))))
    first = int(rng.integers(0, 2))
    bilateral = rng.random() < 0.85
    faint = 1 - 0.6 * difficulty
    for i in range(n_total):
        p = lung_parts[(first + i) % 2] if bilateral else lung_parts[first]
        x, y, phi = _lung_points(p, rng, 1, (0.6, 0.95), np.pi * 0.25, np.pi * 0.6)
        if rng.random() < 0.3 * faint:                           # consolidation: small, dense
            major, amp = rng.uniform(2.5, 5) * px, rng.uniform(0.45, 0.6)
        else:                                                    # ground glass: larger, hazy
            major, amp = rng.uniform(5, 10) * px, rng.uniform(0.28, 0.42) * faint
        # A lesion is a cluster of 3 overlapping blobs stretched along the pleura.
        along = phi + np.pi / 2
        offsets = rng.uniform(-1, 1, 3) * major
        cx = x + offsets * np.cos(along)
        cy = y + offsets * np.sin(along)
        sizes = major * rng.uniform(0.5, 0.9, 3)
        blob = _blobs(u, v, cx, cy, sizes, sizes * rng.uniform(0.5, 0.9, 3), np.repeat(along, 3), np.ones(3))
        patchy = np.clip(np.minimum(blob, 1.2) * (0.4 + 0.9 * texture) - 0.1, 0, 1)
        out += amp * patchy
    return out


# ------------------------------------------------------------------ many slices
def make_slices(n: int = DEFAULT_N, seed: int = 0, size: int = DEFAULT_SIZE,
                difficulty: float = DEFAULT_DIFFICULTY) -> tuple[np.ndarray, np.ndarray]:
    """n slices, balanced (first half... interleaved labels 1, 0, 1, 0, ...) -> (n, 1, size, size), (n,).

    Slice i with label y is make_slice(y, default_rng([seed, y, j])) with j its index within the class,
    the same slice write_dataset writes.
    """
    labels = np.array([COVID if i % 2 == 0 else NON_COVID for i in range(n)], dtype=np.int64)
    images = np.empty((n, 1, size, size), np.float32)
    for i, label in enumerate(labels):
        images[i, 0] = make_slice(int(label), np.random.default_rng([seed, int(label), i // 2]), size, difficulty)
    return images, labels


def _split_counts(n: int, fractions) -> list[int]:
    counts = [int(round(n * f)) for f in fractions]
    counts[0] = n - sum(counts[1:])
    return counts


def write_dataset(out_dir, n: int = DEFAULT_N, seed: int = 0, size: int = DEFAULT_SIZE,
                  difficulty: float = DEFAULT_DIFFICULTY, split_fractions=(0.7, 0.15, 0.15)) -> Path:
    """Write n slices (n // 2 per class) as 8-bit grayscale PNGs in the UCSD layout -> out_dir.

        out_dir/Images-processed/CT_COVID/syn_covid_0000.png ...
        out_dir/Images-processed/CT_NonCOVID/syn_noncovid_0000.png ...
        out_dir/Data-split/COVID/{train,val,test}CT_COVID.txt
        out_dir/Data-split/NonCOVID/{train,val,test}CT_NonCOVID.txt
        out_dir/synthetic.json      (the parameters; written last)

    If out_dir already holds a complete dataset written with the same parameters it
    is reused as it is. read_dataset(out_dir, "train") reads it like the real data.
    """
    fractions = tuple(float(f) for f in split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split_fractions={split_fractions!r}: expected three fractions (train, val, test) summing to 1")
    if n < 6:
        raise DataError(f"write_dataset: n={n}, expected at least 6 images (3 splits x 2 classes)")
    out_dir = Path(out_dir)
    params = {"generator_version": GENERATOR_VERSION, "n": int(n), "seed": int(seed), "size": int(size),
              "difficulty": float(difficulty), "split_fractions": list(fractions)}
    meta = out_dir / "synthetic.json"
    if meta.is_file() and _complete(out_dir, params):
        return out_dir
    if meta.exists():
        meta.unlink()                                  # parameters change: incomplete until rewritten
    per_class = {COVID: n // 2 + n % 2, NON_COVID: n // 2}
    folders = {COVID: ("CT_COVID", "COVID", "syn_covid"), NON_COVID: ("CT_NonCOVID", "NonCOVID", "syn_noncovid")}
    for label, (image_dir, split_dir, prefix) in folders.items():
        images = out_dir / "Images-processed" / image_dir
        images.mkdir(parents=True, exist_ok=True)
        for old in images.glob(f"{prefix}_*.png"):    # stale files of an earlier call
            old.unlink()
        names = []
        for j in range(per_class[label]):
            slice_ = make_slice(label, np.random.default_rng([seed, label, j]), size, difficulty)
            name = f"{prefix}_{j:04d}.png"
            Image.fromarray(np.round(slice_ * 255).astype(np.uint8)).save(images / name)
            names.append(name)
        order = np.random.default_rng([seed, label, 10 ** 6]).permutation(len(names))
        counts = _split_counts(len(names), fractions)
        start = 0
        split_folder = out_dir / "Data-split" / split_dir
        split_folder.mkdir(parents=True, exist_ok=True)
        for split, count in zip(("train", "val", "test"), counts):
            chosen = sorted(names[i] for i in order[start:start + count])
            start += count
            (split_folder / f"{split}{image_dir}.txt").write_text("".join(f"{c}\n" for c in chosen))
    meta.write_text(json.dumps(params, indent=2) + "\n")
    return out_dir


def _complete(out_dir: Path, params: dict) -> bool:
    """True when synthetic.json matches `params` and every listed file exists."""
    try:
        if json.loads((out_dir / "synthetic.json").read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    for image_dir, split_dir in (("CT_COVID", "COVID"), ("CT_NonCOVID", "NonCOVID")):
        for split in ("train", "val", "test"):
            listing = out_dir / "Data-split" / split_dir / f"{split}{image_dir}.txt"
            if not listing.is_file():
                return False
            for name in listing.read_text().split():
                if not (out_dir / "Images-processed" / image_dir / name).is_file():
                    return False
    return True
