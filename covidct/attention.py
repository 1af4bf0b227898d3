"""Lung attention: a training penalty that keeps a CNN's last feature map inside the lungs.

    parse_strengths(spec)                           -> --lung-attention as {(preset, view) or None: strength}
    strength_for(spec, preset, view)                -> the strength for one CNN of a recipe
    lung_masks(x, cache)                            -> (N, H, W) lung masks of a batch, (N,) 1 / 0 found
    outside_share_penalty(features, masks, weights, strength) -> (penalty, its gradient (N, K, h, w))
    LungAttention(trainer)                          -> the training strategy (covidct.frozen) that applies it

Why: the default recipe's CNNs put about 40 % of their Grad-CAM heat inside the lungs, about the
lungs' share of the slice (README, "Cross-validated results"): they read the whole slice evenly.
Forcing them into the lungs, by blanking what lies outside the mask or by pooling the features over
the mask only, cost 0.15 to 0.2 AUC (docs/cross_validation.md, sessions 8 to 10). This penalty is
soft: the network may still use what lies outside, at a price.

A is the output of the Grad-CAM layer (covidct.gradcam.default_layer_index: the last conv map, after
its ReLU, so A >= 0), m the lung mask of the input averaged over each cell of that map (the share of
the cell that is lung), w_n 1 when the input has a plausible mask and 0 when not:

    S_n = sum_kij A_nkij                       all activation of image n       (N,)
    O_n = sum_kij (1 - m_nij) A_nkij           its activation outside the lungs (N,)
    P   = strength / N * sum_n w_n O_n / S_n   the mean share outside, scaled

    dP/dA_nkij = strength / N * w_n * ((1 - m_nij) - O_n / S_n) / S_n

The share, unlike the activation itself, cannot be lowered by shrinking every activation and growing
the next layer's weights. The masks are found on each training input itself (after augmentation;
covidct.lungs.find_lungs, whose answer does not depend on the normalisation), and kept by content,
with the mirror image's beside it: with the default flips an image's masks are found once per run.

``--lung-attention`` (TrainConfig.lung_attention) sets the strength: one number for every CNN of the
recipe, or one per model as ``PRESET[:VIEW]=S`` entries in --model's syntax (the default,
"default:none-window=0.3,deep-small:none-equalize=3": the two whole-slice CNNs; a CNN without an entry
gets 0, none). Only training changes: the checkpoint's model and inference are as without it.
Sequential models only (the default, wide, deep, deep-small and tiny presets).
"""
from __future__ import annotations

import hashlib

import numpy as np

import minicnn as mc

from .errors import CovidCTError
from .frozen import WholeModel
from .lungs import find_lungs

__all__ = ["parse_strengths", "strength_for", "lung_masks", "outside_share_penalty", "LungAttention"]

SPEC_HELP = "a number >= 0, or PRESET[:VIEW]=S entries joined by commas (default:none-window=0.3,deep-small=1)"


def parse_strengths(spec: str) -> dict:
    """--lung-attention -> {None: S} for a bare number (every CNN), {(preset, view or None): S} for entries:
    "default:none-window=0.3,deep-small=1" -> {("default", ("none", "window")): 0.3, ("deep-small", None): 1.0}."""
    from .model import PRESETS
    from .preprocess import view_pairs, views_error

    strengths = {}
    for entry in str(spec).split(","):
        key, equals, value = entry.strip().rpartition("=")
        preset, _, view = key.partition(":")
        try:
            strength = float(value)
        except ValueError:
            strength = float("nan")
        bad_key = equals and (preset not in PRESETS or view and (views_error(view, "none") or
                                                                 len(view_pairs(view, "none")) != 1))
        if not 0 <= strength < float("inf") or bad_key or (equals and not key) or (not equals and len(strengths)):
            raise CovidCTError(f"--lung-attention {spec}: expected {SPEC_HELP}")
        strengths[(preset, view_pairs(view, "none")[0] if view else None) if equals else None] = strength
    if None in strengths and len(strengths) > 1:
        raise CovidCTError(f"--lung-attention {spec}: expected {SPEC_HELP}")
    return strengths


def strength_for(spec: str, preset: str, view: tuple[str, str]) -> float:
    """The strength for ``preset`` on ``view`` ((lungs, intensity)): its PRESET:VIEW entry, else its PRESET
    entry, else the bare number, else 0."""
    strengths = parse_strengths(spec)
    for key in ((preset, tuple(view)), (preset, None), None):
        if key in strengths:
            return strengths[key]
    return 0.0


def _key(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


def lung_masks(x, cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, H, W) inputs (any normalisation) -> ((N, H, W) float32 lung masks, (N,) float64 weights:
    1 where the mask is plausible, 0 where find_lungs fell back to the whole slice (its mask then all
    ones, and no penalty)). cache: content -> (mask, weight), filled with each image and its mirror."""
    images = mc.as_numpy(x)[:, 0]
    cache = {} if cache is None else cache
    masks, weights = [], []
    for image in images:
        key = _key(image)
        if key not in cache:
            lungs = find_lungs(image)
            cache[key] = (lungs.mask, float(lungs.found))
            cache[_key(image[:, ::-1])] = (lungs.mask[:, ::-1], float(lungs.found))
        mask, weight = cache[key]
        masks.append(mask)
        weights.append(weight)
    return np.stack(masks).astype(np.float32), np.array(weights)


def outside_share_penalty(features, masks, weights, strength: float):
    """features A (N, K, h, w) >= 0; masks (N, H, W) in [0, 1] with H, W multiples of h, w; weights (N,)
    -> (P, dP/dA (N, K, h, w)) as in the module docstring."""
    xp = mc.get_array_module(features)
    n, _, h, w = features.shape
    big_h, big_w = masks.shape[1:]
    if big_h % h or big_w % w:
        raise CovidCTError(f"lung attention: a {big_h}x{big_w} input does not divide into the {h}x{w} feature map")
    # share of each map cell that is lung (N, 1, h, w), on the features' device
    inside = masks.reshape(n, h, big_h // h, w, big_w // w).mean(axis=(2, 4))[:, None]
    outside = xp.asarray(1.0 - inside, dtype=features.dtype)
    weights = xp.asarray(weights, dtype=features.dtype)
    total = features.sum(axis=(1, 2, 3)) + 1e-6                       # S_n (N,)
    share = (features * outside).sum(axis=(1, 2, 3)) / total          # O_n / S_n (N,)
    penalty = strength / n * float((weights * share).sum())
    scale = (strength / n * weights / total)[:, None, None, None]
    grad = scale * (outside - share[:, None, None, None])
    return penalty, grad


class LungAttention(WholeModel):
    """Every layer learns, and the last conv map's share of activation outside the lungs is penalised.

    The model runs in two parts, up to the Grad-CAM layer (front) and after it (back), so that the
    penalty's gradient joins the classifier's where the features are."""

    def __init__(self, trainer):
        super().__init__(trainer)
        from .gradcam import default_layer_index

        model = trainer.model
        if not isinstance(model, mc.Sequential):
            raise CovidCTError(f"--lung-attention needs a Sequential model (presets default, wide, deep, "
                               f"deep-small, tiny), not {type(model).__name__}")
        layers = list(model)
        cut = default_layer_index(model) + 1
        self.front, self.back = mc.Sequential(*layers[:cut]), mc.Sequential(*layers[cut:])
        self.strength = trainer.config.attention_strength
        self.cache, self.shares = {}, []

    def forward(self, x):
        self.masks, self.weights = lung_masks(x, self.cache)
        self.features = self.front(x)                                   # (N, K, h, w)
        return self.back(self.features)

    def backward(self, grad_logits) -> None:
        grad_features = self.back.backward(grad_logits)
        penalty, grad_penalty = outside_share_penalty(self.features, self.masks, self.weights, self.strength)
        if self.weights.sum() > 0:
            self.shares.append(penalty / self.strength * len(self.weights) / self.weights.sum())
        self.front.backward(grad_features + grad_penalty)
        self.features = None

    def outside_share(self) -> float | None:
        """Mean share of activation outside the lungs over this epoch's batches (then reset)."""
        shares, self.shares = self.shares, []
        return float(np.mean(shares)) if shares else None
