"""Random data augmentation on host batches, applied on the fly per batch.

Every transform has the call signature

    augment(batch, rng) -> new batch      batch: float32 (N, C, H, W); rng: numpy Generator

keeps dtype float32 and shape, draws its random numbers from `rng` only (same
seed -> same batch) and never modifies its input in place. Each image in the
batch gets its own random parameters.

Build a pipeline in Python or from a spec string (stored in checkpoints):

    Compose([HorizontalFlip(), Rotate(15), Translate(0.1), Blur(1.0)])
    parse_augment("flip,rotate:15,translate:0.1,blur:1.0")      # the same
    parse_augment("1,2,3,5")                                     # the same (report's codes)
    str(parse_augment("2"))  == "rotate:15"
    parse_augment("none") / parse_augment("")                    # no augmentation

Spec tokens are ``name`` or ``name:value`` or ``name:value:p`` (see SPEC_HELP).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from covidct.errors import DataError

__all__ = [
    "Transform",
    "HorizontalFlip",
    "VerticalFlip",
    "Rotate",
    "Translate",
    "Blur",
    "Brightness",
    "Contrast",
    "RandomResizedCrop",
    "Compose",
    "parse_augment",
    "TRANSFORMS",
    "ALIASES",
]


def _as_batch(batch) -> np.ndarray:
    """Check (N, C, H, W) and return a float32 copy (so the caller's array is never touched)."""
    batch = np.asarray(batch)
    if batch.ndim != 4:
        raise ValueError(f"augmentation expects a batch (N, C, H, W), got shape {batch.shape}")
    return batch.astype(np.float32, copy=True)


def _fmt(value: float) -> str:
    return f"{value:g}"


class Transform:
    """Base class. `params` names the spec values in order; the first one is the main one."""
    name = ""
    params: tuple[str, ...] = ()
    defaults: tuple[float, ...] = ()

    def __call__(self, batch, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def spec(self) -> str:
        """Canonical spec token, e.g. "rotate:15"; extra values only when not default."""
        values = [getattr(self, p) for p in self.params]
        extras_default = all(v == d for v, d in zip(values[1:], self.defaults[1:]))
        shown = values[:1] if extras_default else values
        return ":".join([self.name] + [_fmt(v) for v in shown])

    describe = spec

    def __str__(self) -> str:
        return self.spec()

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)!r}" for p in self.params)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.spec() == other.spec()


def _check_range(transform: str, name: str, value, low: float, high: float) -> float:
    value = float(value)
    if not (low <= value <= high):
        raise DataError(f"augmentation {transform}: {name}={value:g} is outside [{low:g}, {high:g}]")
    return value


class HorizontalFlip(Transform):
    """Mirror left-right with probability p (left and right lung swap)."""
    name, params, defaults = "hflip", ("p",), (0.5,)

    def __init__(self, p: float = 0.5):
        self.p = _check_range(self.name, "p", p, 0, 1)

    def __call__(self, batch, rng):
        out = _as_batch(batch)
        flip = rng.random(len(out)) < self.p
        out[flip] = out[flip][..., ::-1]
        return out


class VerticalFlip(Transform):
    """Mirror top-bottom with probability p (anatomically unusual for CT; not a default)."""
    name, params, defaults = "vflip", ("p",), (0.5,)

    def __init__(self, p: float = 0.5):
        self.p = _check_range(self.name, "p", p, 0, 1)

    def __call__(self, batch, rng):
        out = _as_batch(batch)
        flip = rng.random(len(out)) < self.p
        out[flip] = out[flip][..., ::-1, :]
        return out


class Rotate(Transform):
    """Rotate each image by an angle drawn uniformly from [-degrees, degrees]; corners fill with 0."""
    name, params, defaults = "rotate", ("degrees",), (15.0,)

    def __init__(self, degrees: float = 15.0):
        self.degrees = _check_range(self.name, "degrees", degrees, 0, 180)

    def __call__(self, batch, rng):
        out = _as_batch(batch)
        angles = rng.uniform(-self.degrees, self.degrees, size=len(out))
        for i, angle in enumerate(angles):
            if angle != 0:
                out[i] = ndimage.rotate(out[i], angle, axes=(2, 1), reshape=False, order=1,
                                        mode="constant", cval=0.0)
        return out


class Translate(Transform):
    """Shift each image by up to `fraction` of its height/width in each direction; fill with 0."""
    name, params, defaults = "translate", ("fraction",), (0.1,)

    def __init__(self, fraction: float = 0.1):
        self.fraction = _check_range(self.name, "fraction", fraction, 0, 0.5)

    def __call__(self, batch, rng):
        out = _as_batch(batch)
        h, w = out.shape[2:]
        shifts = rng.uniform(-self.fraction, self.fraction, size=(len(out), 2)) * (h, w)
        for i, (dy, dx) in enumerate(shifts):
            if dy != 0 or dx != 0:
                out[i] = ndimage.shift(out[i], (0, dy, dx), order=1, mode="constant", cval=0.0)
        return out


class Blur(Transform):
    """With probability p, Gaussian blur with sigma drawn uniformly from [0, sigma] pixels."""
    name, params, defaults = "blur", ("sigma", "p"), (1.0, 0.5)

    def __init__(self, sigma: float = 1.0, p: float = 0.5):
        self.sigma = _check_range(self.name, "sigma", sigma, 0, 100)
        self.p = _check_range(self.name, "p", p, 0, 1)

    def __call__(self, batch, rng):
        out = _as_batch(batch)
        apply = rng.random(len(out)) < self.p
        sigmas = rng.uniform(0, self.sigma, size=len(out))
        for i in np.flatnonzero(apply):
            if sigmas[i] > 0:
                out[i] = ndimage.gaussian_filter(out[i], sigma=(0, sigmas[i], sigmas[i]), mode="nearest")
        return out


class Brightness(Transform):
    """Add an offset drawn from [-delta, delta] to each image; clip to [0, 1]."""
    name, params, defaults = "brightness", ("delta",), (0.1,)

    def __init__(self, delta: float = 0.1):
        self.delta = _check_range(self.name, "delta", delta, 0, 1)

    def __call__(self, batch, rng):
        out = _as_batch(batch)
        offsets = rng.uniform(-self.delta, self.delta, size=(len(out), 1, 1, 1)).astype(np.float32)
        return np.clip(out + offsets, 0.0, 1.0)


class Contrast(Transform):
    """Scale each image's deviation from its mean by a factor in [1 - amount, 1 + amount]; clip to [0, 1]."""
    name, params, defaults = "contrast", ("amount",), (0.1,)

    def __init__(self, amount: float = 0.1):
        self.amount = _check_range(self.name, "amount", amount, 0, 1)

    def __call__(self, batch, rng):
        out = _as_batch(batch)
        factors = rng.uniform(1 - self.amount, 1 + self.amount, size=(len(out), 1, 1, 1)).astype(np.float32)
        means = out.mean(axis=(1, 2, 3), keepdims=True)
        return np.clip(means + (out - means) * factors, 0.0, 1.0).astype(np.float32)


class RandomResizedCrop(Transform):
    """Crop a random box (area fraction in [scale, 1], aspect 3/4..4/3) and resize it back to H x W."""
    name, params, defaults = "crop", ("scale",), (0.8,)

    def __init__(self, scale: float = 0.8):
        self.scale = _check_range(self.name, "scale", scale, 0.05, 1)

    def __call__(self, batch, rng):
        out = _as_batch(batch)
        n, c, h, w = out.shape
        areas = rng.uniform(self.scale, 1.0, size=n)
        log_ratios = rng.uniform(np.log(3 / 4), np.log(4 / 3), size=n)
        corners = rng.random(size=(n, 2))
        for i in range(n):
            ratio = np.exp(log_ratios[i])                       # crop width / height
            crop_h = min(h, h * np.sqrt(areas[i] / ratio))
            crop_w = min(w, w * np.sqrt(areas[i] * ratio))
            top, left = corners[i, 0] * (h - crop_h), corners[i, 1] * (w - crop_w)
            # output pixel (y, x) samples input (top + (y + .5) * crop_h / h - .5, ...)
            scale = np.array([crop_h / h, crop_w / w])
            offset = np.array([top, left]) + 0.5 * scale - 0.5
            for ch in range(c):
                out[i, ch] = ndimage.affine_transform(out[i, ch], scale, offset=offset, order=1, mode="nearest")
        return out


class Compose(Transform):
    """Apply transforms in order. Compose([]) is "no augmentation" (returns a copy)."""
    name = "compose"

    def __init__(self, transforms=()):
        self.transforms = list(transforms)

    def __call__(self, batch, rng):
        out = _as_batch(batch)
        for transform in self.transforms:
            out = transform(out, rng)
        return out

    def spec(self) -> str:
        return ",".join(t.spec() for t in self.transforms) or "none"

    describe = spec

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"

    def __len__(self) -> int:
        return len(self.transforms)

    def __bool__(self) -> bool:        # "if augment:" is False for "none"
        return bool(self.transforms)


TRANSFORMS = {cls.name: cls for cls in (HorizontalFlip, VerticalFlip, Rotate, Translate, Blur,
                                        Brightness, Contrast, RandomResizedCrop)}
# The 2020 report's numeric codes and short names.
ALIASES = {"flip": "hflip", "1": "hflip", "2": "rotate", "3": "translate", "5": "blur"}
SPEC_HELP = ("valid names: " + ", ".join(TRANSFORMS) + "; aliases: "
             + ", ".join(f"{a}={n}" for a, n in ALIASES.items()) + "; or 'none'")


def parse_augment(spec) -> Compose:
    """"flip,rotate:15,translate:0.1,blur:1.0" -> Compose([...]). None, "" or "none" -> Compose([]).

    A Transform (or Compose) is returned as a Compose unchanged, so callers may pass either.
    """
    if isinstance(spec, Compose):
        return spec
    if isinstance(spec, Transform):
        return Compose([spec])
    if spec is None:
        return Compose([])
    if not isinstance(spec, str):
        raise DataError(f"augmentation spec {spec!r}: expected a string like 'flip,rotate:15'")
    text = spec.strip().lower()
    if text in ("", "none"):
        return Compose([])
    transforms = []
    for token in text.split(","):
        token = token.strip()
        name, *values = [part.strip() for part in token.split(":")]
        name = ALIASES.get(name, name)
        if name not in TRANSFORMS:
            raise DataError(f"augmentation spec {spec!r}: unknown transform {token!r}; {SPEC_HELP}")
        cls = TRANSFORMS[name]
        if len(values) > len(cls.params):
            raise DataError(f"augmentation spec {spec!r}: {token!r} takes at most {len(cls.params)} "
                            f"value(s) ({', '.join(cls.params)})")
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            raise DataError(f"augmentation spec {spec!r}: {token!r} has a value that is not a number") from None
        try:
            transforms.append(cls(*numbers))
        except DataError as error:
            raise DataError(f"augmentation spec {spec!r}: {token!r}: {error}") from None
    return Compose(transforms)
