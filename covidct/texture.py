"""Lung texture: hand-made statistics of the gray levels inside the lung mask, and a logistic regression on them.

    lung_texture_features(gray, mask)            -> (94,) float64 features of one slice
    gray_texture_features(gray, intensities)     -> the same of a whole slice (h, w), read as TEXTURE_VIEW,
                                                    for each gray scale in intensities: (94 x T,)
    texture_features(paths, intensities, jobs)   -> (N, 94 x T) of image files (jobs: worker processes)
    gray_scale_features(features, index)         -> (N, 94): the index-th gray scale's columns of those
    texture_inputs(model, paths | grays)         -> those features when the model takes them, else None
                                                    (one worker process per core)
    fit_logistic(features, labels, l2)           -> LogisticModel: standardisation + weights; .log_odds(features)
    choose_l2(features, labels, groups, seed)    -> the L2 strength with the best inner grouped-CV AUC
    fit_texture(features, labels, groups, seed)  -> TextureMember: choose_l2, then fit_logistic on them all
    fit_textures(features, ..., intensities)     -> [TextureMember] of several gray scales' columns
    TextureMember(model, l2, intensity)          -> the fitted regression as an ensemble member (covidct.ensemble)

Why: the CNNs of the default recipe read each slice at 128 px, where the fine texture of
ground-glass opacities is mostly gone, and their Grad-CAM heat has no preferred place relative
to the lungs. These features look only inside the lung mask, at 224 px. Alone they rank
COVID-CT slices worse than a CNN (cross-validated AUC ~0.74 against ~0.81), but they err
elsewhere: joined with the session-10 default's five CNNs as a sixth member they gained on every
fold draw measured (README, "Cross-validated results"), and the default recipe now has two of them
beside three CNNs. The default recipe (``--model ...,texture,texture:none-equalize``, covidct.train)
fits them on the training slices and saves them in ensemble.npz as TextureMembers beside the
CNNs; the ensemble then takes each slice's features beside its pixels (covidct.ensemble),
computed from the slice itself at 224 px, not from the CNNs' 128 px input.

Features of a window-calibrated slice ``gray`` (H, W) in [0, 1] and its lung mask (bool):
  - 32-bin histogram of the lungs' gray levels (square roots of the shares)           32
  - 16-bin histogram of the gradient magnitude (Gaussian, sigma 1 px) inside them      16
  - local binary patterns (8 neighbours at radius 1, 2 and 4; the 9 uniform codes,
    by their number of brighter neighbours, and 1 for the rest) inside them           3 x 10
  - mean and 90th percentile of |gray(y, x + d) - gray(y, x)| inside them, d = 1, 2, 4, 8     8
  - mean and sd of the gray levels in bands 0-2, 2-5, 5-10 and over 10 px in from the
    lungs' edge                                                                          8
A slice without a plausible mask (``covidct.lungs.find_lungs``) uses the whole slice and zero bands.

Gray scales (``intensity``, one texture member each; ``--model ...,texture,texture:none-equalize``):
the lung mask is always found on the window-calibrated slice, and the features are read either
there (``window``, the first texture member) or on the same slice histogram-equalised
(``equalize``) or as decoded (``none``). Equalised, the same statistics rank slices about as well
alone and err elsewhere (README, "Cross-validated results").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

import minicnn as mc

from .errors import CovidCTError

__all__ = ["TEXTURE_VIEW", "TEXTURE_INTENSITIES", "TEXTURE_VERSION", "N_FEATURES", "L2_GRID", "texture_name",
           "lung_texture_features", "gray_texture_features", "slice_texture_features", "texture_features",
           "gray_scale_features", "texture_inputs", "LogisticModel", "fit_logistic", "choose_l2", "fit_texture",
           "fit_textures", "TextureMember"]

TEXTURE_VIEW = dict(size=224, resize="stretch", lungs="none", intensity="window")   # covidct.preprocess.Preprocess
TEXTURE_INTENSITIES = ("window", "equalize", "none")   # gray scales a texture member may read
TEXTURE_VERSION = 1                   # of the feature definition below: checkpoints store it
LBP_RADII = (1, 2, 4)
DIFF_STEPS = (1, 2, 4, 8)
EDGE_BANDS = (2, 5, 10)               # px in from the lungs' edge
N_FEATURES = 32 + 16 + 10 * len(LBP_RADII) + 2 * len(DIFF_STEPS) + 2 * (len(EDGE_BANDS) + 1)
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def texture_name(intensity: str) -> str:
    """A texture model's name in run folders and cv-join: "texture" (window-calibrated, the first),
    "texture-none-equalize", "texture-none" (as decoded)."""
    from .preprocess import view_name

    return "texture" if intensity == "window" else f"texture-{view_name('none', intensity)}"


def _histogram(values, bins: int, value_range=(0.0, 1.0)) -> np.ndarray:
    """Square roots of the shares of ``values`` in ``bins`` equal bins (zeros when there are none)."""
    if values.size == 0:
        return np.zeros(bins)
    return np.sqrt(np.histogram(values, bins, range=value_range)[0] / values.size)


def lbp_codes(gray, radius: int) -> np.ndarray:
    """Local binary pattern of every pixel at least ``radius`` from the border -> int (H - 2r, W - 2r):
    the number of its 8 neighbours at distance ``radius`` that are at least as bright, when the ring
    of comparisons changes at most twice (a uniform pattern: 0..8), else 9."""
    h, w = gray.shape
    r = radius
    centre = gray[r:h - r, r:w - r]
    neighbours = [(-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r)]     # around the ring
    bits = np.stack([gray[r + dy:h - r + dy, r + dx:w - r + dx] >= centre for dy, dx in neighbours], axis=-1)
    changes = (bits != np.roll(bits, 1, axis=-1)).sum(axis=-1)
    return np.where(changes <= 2, bits.sum(axis=-1), 9)


def lung_texture_features(gray, mask) -> np.ndarray:
    """(N_FEATURES,) float64 features of a (H, W) slice in [0, 1] inside its lung mask (module docstring);
    mask None: the whole slice, and zeros for the bands from the lungs' edge."""
    gray = np.asarray(gray, dtype=np.float64)
    found = mask is not None
    mask = np.asarray(mask, bool) if found else np.ones(gray.shape, bool)
    features = [_histogram(gray[mask], 32)]
    gradient = ndimage.gaussian_gradient_magnitude(gray, 1.0)
    features.append(_histogram(gradient[mask], 16, (0.0, 0.3)))
    for r in LBP_RADII:
        inner = mask[r:-r, r:-r]
        counts = np.bincount(lbp_codes(gray, r)[inner], minlength=10)
        features.append(np.sqrt(counts / max(1, inner.sum())))
    for d in DIFF_STEPS:
        both = mask[:, d:] & mask[:, :-d]
        difference = np.abs(gray[:, d:] - gray[:, :-d])[both]
        features.append([difference.mean(), np.percentile(difference, 90)] if difference.size else [0.0, 0.0])
    if found:
        depth = ndimage.distance_transform_edt(mask)                  # px in from the lungs' edge
        band = np.digitize(depth, EDGE_BANDS)
        levels = [gray[mask & (band == b)] for b in range(len(EDGE_BANDS) + 1)]
        features.append([v.mean() if v.size else 0.0 for v in levels])
        features.append([v.std() if v.size > 1 else 0.0 for v in levels])
    else:
        features.append(np.zeros(2 * (len(EDGE_BANDS) + 1)))
    return np.concatenate([np.ravel(f) for f in features]).astype(np.float64)


def gray_texture_features(gray, intensities=("window",)) -> np.ndarray:
    """lung_texture_features of a whole slice (h, w) in [0, 1] as decoded (any size), prepared as
    TEXTURE_VIEW (224 px) with the lung mask of its window-calibrated view (None when covidct.lungs
    finds no plausible one), read on each gray scale of ``intensities`` in turn -> (94 x T,)."""
    from .lungs import find_lungs
    from .preprocess import Preprocess, prepare_gray

    def view(intensity):                                                        # (224, 224)
        return prepare_gray(gray, Preprocess(**{**TEXTURE_VIEW, "intensity": intensity}))[0][0]

    calibrated = view("window")
    lungs = find_lungs(calibrated)
    mask = lungs.mask if lungs.found else None
    return np.concatenate([lung_texture_features(calibrated if intensity == "window" else view(intensity), mask)
                           for intensity in intensities])


def slice_texture_features(path, intensities=("window",)) -> np.ndarray:
    """gray_texture_features of an image file."""
    from .preprocess import read_gray

    return gray_texture_features(read_gray(path), intensities)


def texture_features(paths, intensities=("window",), jobs: int = 1) -> np.ndarray:
    """(N, N_FEATURES x T) float64: slice_texture_features of every file (about 0.13 s a slice for one
    gray scale, 0.16 s for two, on one core of the 2-core machine). jobs > 1: the files are split into
    that many runs of neighbours, each read in a worker process (at least 2 files each). A slice's
    features depend on it alone, computed with BLAS on one thread everywhere, so the numbers are the
    serial ones bit for bit."""
    return _in_workers(slice_texture_features, list(paths), intensities, jobs)


def _in_workers(features_of, items: list, intensities, jobs: int) -> np.ndarray:
    """(N, N_FEATURES x T): features_of(item, intensities) of every item, in order, computed in runs of
    neighbours by min(jobs, N // 2) worker processes (in this process when that is 1)."""
    if not items:
        return np.zeros((0, N_FEATURES * len(intensities)))
    jobs = min(int(jobs), len(items) // 2)
    if jobs <= 1:
        return _stacked(features_of, items, intensities)
    from concurrent.futures import ProcessPoolExecutor

    from .workers import limit_threads, worker_threads

    n = len(items)
    runs = [items[n * index // jobs:n * (index + 1) // jobs] for index in range(jobs)]     # as even as can be
    with ProcessPoolExecutor(max_workers=jobs, initializer=limit_threads, initargs=(worker_threads(jobs),)) as pool:
        return np.concatenate(list(pool.map(_stacked, [features_of] * jobs, runs, [intensities] * jobs)))


def _stacked(features_of, items, intensities) -> np.ndarray:
    """(n, N_FEATURES x T), BLAS on one thread (the lung mask's convex hull is a matrix product), so that
    the numbers do not depend on the cores or on how the items were shared out."""
    from minicnn.fast import one_blas_thread

    with one_blas_thread():
        return np.stack([features_of(item, intensities) for item in items])


def gray_scale_features(features, index: int) -> np.ndarray:
    """The (N, N_FEATURES) columns of gray scale number ``index`` in features (N, N_FEATURES x T)
    of several gray scales (texture_features(paths, intensities))."""
    return features[:, index * N_FEATURES:(index + 1) * N_FEATURES]


@dataclass
class LogisticModel:
    """log-odds(x) = ((x - mean) / scale) . weights + bias."""
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    def log_odds(self, features) -> np.ndarray:
        return ((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.weights + self.bias


def fit_logistic(features, labels, l2: float) -> LogisticModel:
    """L2-regularised logistic regression on standardised features (scipy's L-BFGS):
    minimises mean log-loss + l2 * |w|^2 (the bias is not penalised). Deterministic."""
    from scipy.optimize import minimize

    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / scale

    def loss_and_grad(params):
        weights, bias = params[:-1], params[-1]
        p = 1.0 / (1.0 + np.exp(-(z @ weights + bias)))
        loss = -np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)) + l2 * weights @ weights
        return loss, np.r_[z.T @ (p - y) / len(y) + 2 * l2 * weights, np.mean(p - y)]

    params = minimize(loss_and_grad, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B",
                      options={"maxiter": 2000}).x
    return LogisticModel(mean, scale, params[:-1], float(params[-1]))


def choose_l2(features, labels, groups, seed: int = 0, grid=L2_GRID, folds: int = 5) -> float:
    """The L2 strength of ``grid`` whose inner k-fold CV (folds grouped by source, as covidct.cv's)
    gives the best AUC on these (training) slices only."""
    from .cv import grouped_folds
    from .metrics import roc_auc

    x, y = np.asarray(features, np.float64), np.asarray(labels, np.int64)
    inner = grouped_folds(y, list(groups), folds, seed=seed)
    scores = []
    for l2 in grid:
        log_odds = np.zeros(len(y))
        for fold in range(folds):
            held = inner == fold
            log_odds[held] = fit_logistic(x[~held], y[~held], l2).log_odds(x[held])
        scores.append(roc_auc(y, log_odds))
    return float(grid[int(np.argmax(scores))])


def texture_inputs(model, paths=None, grays=None, jobs: int | None = None):
    """The lung-texture features a model takes beside the pixels: (N, N_FEATURES x T) of these files (or
    whole gray slices), each texture member's gray scale in turn, when it is an ensemble with T texture
    members (covidct.ensemble.reads_texture), else None (no time spent). Computed by ``jobs`` worker
    processes (default: one per core; evaluate, predict and serve spend most of their time here)."""
    from minicnn.fast import available_cores

    from .ensemble import reads_texture

    if not reads_texture(model):
        return None
    intensities = [texture.intensity for texture in model.textures]
    jobs = jobs or available_cores()
    if grays is not None:
        return _in_workers(gray_texture_features, list(grays), intensities, jobs)
    return texture_features(paths, intensities, jobs)


def fit_texture(features, labels, groups, seed: int = 0, intensity: str = "window") -> "TextureMember":
    """The texture member of an ensemble, fitted on training slices only (their features on the gray
    scale ``intensity``): the L2 strength by choose_l2 (inner CV grouped by source), then the
    logistic regression on all of them."""
    l2 = choose_l2(features, labels, groups, seed=seed)
    return TextureMember(fit_logistic(features, labels, l2), l2, intensity)


def fit_textures(features, labels, groups, intensities=("window",), seed: int = 0) -> list["TextureMember"]:
    """fit_texture on each gray scale's columns of features (N, N_FEATURES x T) -> one TextureMember per
    gray scale of ``intensities``, in order."""
    return [fit_texture(gray_scale_features(features, index), labels, groups, seed=seed, intensity=intensity)
            for index, intensity in enumerate(intensities)]


class TextureMember(mc.Module):
    """The lung-texture logistic regression as an ensemble member (covidct.ensemble):
    features (N, N_FEATURES) on the gray scale ``intensity`` -> log-odds of COVID (N,), on the host in
    float64.

    It is fitted (fit_texture), not trained by backprop; its arrays are buffers, so an
    ensemble's state_dict and checkpoint hold them (``texture0.mean``, ``texture0.weights``, ...)."""

    def __init__(self, model: LogisticModel | None = None, l2: float = 0.0, intensity: str = "window"):
        if intensity not in TEXTURE_INTENSITIES:
            raise CovidCTError(f"texture intensity {intensity!r}: expected one of {', '.join(TEXTURE_INTENSITIES)}")
        if model is None:                                                  # a shell that load_state_dict fills
            model = LogisticModel(np.zeros(N_FEATURES), np.ones(N_FEATURES), np.zeros(N_FEATURES), 0.0)
        self.register_buffer("mean", np.asarray(model.mean, np.float64))
        self.register_buffer("scale", np.asarray(model.scale, np.float64))
        self.register_buffer("weights", np.asarray(model.weights, np.float64))
        self.register_buffer("bias", np.array([model.bias], np.float64))
        self.l2 = float(l2)
        self.intensity = intensity

    def forward(self, features):
        regression = LogisticModel(*(mc.as_numpy(array) for array in (self.mean, self.scale, self.weights)),
                                   float(mc.as_numpy(self.bias)[0]))
        return regression.log_odds(mc.as_numpy(features))

    def p_covid(self, features) -> np.ndarray:
        """P(COVID) (N,) of the slices with these features."""
        return 1.0 / (1.0 + np.exp(-self.forward(features)))

    def backward(self, grad):
        raise NotImplementedError("a TextureMember is fitted by covidct.texture.fit_texture, not trained by backprop")
