"""Turn image files into one float32 array per image, the same way for every file.

    load_image(path, pre)                      -> (1, H, W) float32 in [0, 1]
    load_images(dataset, pre, cache_dir=...)   -> images (N, 1, H, W), labels (N,), paths
    compute_normalization(train_images)        -> (mean, std)
    normalize(images, mean, std)               -> (images - mean) / std

Why "the same way for every file": in COVID-CT the COVID images are PNG (some
RGBA) and the non-COVID images are mostly JPEG. If RGBA, RGB, L and JPEG were
converted differently, the network could learn the file format instead of the
lungs. So every mode goes through one rule (``to_gray``):

    mode            gray value in [0, 1]
    1               0 or 1
    L, P(no alpha)  value / 255           (P is expanded through its palette)
    RGB, CMYK, ...  (0.299 R + 0.587 G + 0.114 B) / 255   (CMYK via PIL's RGB conversion)
    LA, RGBA, PA    gray * alpha / 255    (composited onto black = air; opaque -> unchanged)
    I;16*, I        value / 65535         (16-bit PNG/TIFF; clipped to [0, 1])
    F               value, clipped to [0, 1]  (32-bit float is taken as already scaled)

No per-image min/max stretching: the intensity scale is the mode's real range.
A float image whose pixels are all NaN/inf is refused (it holds no image); one
with some NaN/inf pixels is read with them as 0, with a warning.

Memory: an image with more than MAX_PIXELS pixels is refused from its header,
before decoding (``covidct --max-pixels N`` changes the limit), and the
decoding threads together hold at most DECODE_BUDGET_PIXELS pixels at once: a
big image waits and decodes alone instead of four decoding side by side.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidct.errors import DataError

__all__ = [
    "RESIZE_MODES",
    "Preprocess",
    "to_gray",
    "load_image",
    "load_images",
    "compute_normalization",
    "normalize",
    "clear_memory_cache",
]

RESIZE_MODES = ("pad", "stretch")
LUNG_MODES = ("none", "crop", "mask")
INTENSITY_MODES = ("none", "equalize", "window")
CACHE_VERSION = 2                      # bump when the decoding rule changes
MEMORY_CACHE_BYTES = 1 << 30           # at most 1 GiB of decoded images kept in memory
RGB_WEIGHTS = (0.299, 0.587, 0.114)    # ITU-R BT.601 luma, as PIL's "L" conversion
MAX_PIXELS = 50_000_000                # larger images are refused before decoding (covidct --max-pixels)
DECODE_BUDGET_PIXELS = 32_000_000      # pixels being decoded at once, over all threads (~20 bytes each)


def is_mode_list(value, modes) -> bool:
    """Is ``value`` one of ``modes``, or several different ones joined by commas ("none,crop")?"""
    listed = value.split(",") if isinstance(value, str) else [value]
    return all(mode in modes for mode in listed) and len(set(listed)) == len(listed)


def view_pairs(lungs: str, intensity: str) -> tuple[tuple[str, str], ...]:
    """Every (lungs, intensity) view of two comma-joined mode lists, lungs-major.

    A lungs entry that names its own intensity ("none-window") is that one view; a plain one
    ("crop") is taken with every intensity mode: ("none-window,crop", "none") ->
    (("none", "window"), ("crop", "none"))."""
    pairs = []
    for lung_mode in lungs.split(","):
        if "-" in lung_mode:
            pairs.append(tuple(lung_mode.split("-", 1)))
        else:
            pairs += [(lung_mode, intensity_mode) for intensity_mode in intensity.split(",")]
    return tuple(pairs)


def view_modes(views, lungs: str, intensity: str) -> tuple[str, str]:
    """(lungs, intensity) mode lists whose views are exactly ``views``: the given lists where their
    product is ``views``, else the views one by one ("none-window,crop", "none")."""
    if view_pairs(lungs, intensity) == tuple(views):
        return lungs, intensity
    return ",".join(view_name(*view) for view in views), "none"


def views_error(lungs, intensity) -> str | None:
    """What is wrong with a (lungs, intensity) pair of mode lists, or None when they are valid."""
    lung_views = LUNG_MODES + tuple(f"{lung}-{mode}" for lung in LUNG_MODES for mode in INTENSITY_MODES)
    if not is_mode_list(lungs, lung_views):
        return (f"lungs={lungs!r}: expected one of {', '.join(LUNG_MODES)}, each optionally with its own "
                f"intensity (none-window), or several different ones joined by commas (none,crop)")
    if not is_mode_list(intensity, INTENSITY_MODES):
        return (f"intensity={intensity!r}: expected one of {', '.join(INTENSITY_MODES)}, or several "
                f"different ones joined by commas (none,equalize)")
    views = view_pairs(lungs, intensity)
    if len(set(views)) < len(views):
        return f"lungs={lungs!r} with intensity={intensity!r}: the same view twice"
    return None


def view_name(lungs: str, intensity: str) -> str:
    """A view's short name for run folders and logs: "crop", "none-equalize"."""
    return lungs if intensity == "none" else f"{lungs}-{intensity}"


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes a (1, size, size) float32 array (or (views, size, size): see lungs).

    size:   output height = width in pixels.
    resize: "pad"     keep the aspect ratio: scale the longer side to `size`, centre
                      the image on a black (= air) square canvas. Default: anatomy
                      keeps its shape; the real slices are 0.9-2.4 times wider than high.
            "stretch" plain resize to size x size (distorts wide images).
    lungs:  "none"    the whole slice.
            "crop"    cut the slice to its lung fields' box, widened by lung_margin
                      (covidct.lungs), before resizing; slices whose lung mask is
                      implausible keep the whole slice (counted by load_images).
            "mask"    as crop, and everything outside the (slightly grown) lung mask
                      is set to 0 (air).
            "none,crop" (several modes joined by commas): several views, see below.
    intensity: "none"     the gray values as decoded.
            "equalize" histogram equalisation of each slice (after the lung cut, before
                      the resize; see equalize): every slice then uses the whole gray
                      range evenly, whatever window, contrast and gamma the figure it
                      came from had.
            "window"  a display-window calibration of each slice on two of its own tissues
                      (before the lung cut; see window_calibrate): the lungs' median gray
                      becomes LUNG_GRAY, the soft tissue's SOFT_TISSUE_GRAY, linearly, so
                      figures shown with other windows and levels look alike while the
                      density order (and a lesion's place between lung and tissue) stays.
    Several views: lungs and intensity may each list several modes joined by commas;
    every combination is one view, lungs-major ("none,crop" x "none,equalize": whole,
    whole equalised, crop, crop equalised). A lungs entry may name its own intensity,
    "none-window": then it is that one view ("none-window,crop": the whole slice
    window-calibrated, and the lung crop as decoded). The output has one channel per view:
    (views, size, size). That is the input of a multi-view ensemble, whose members each
    read one channel (covidct.ensemble).
    Stored in checkpoints as JSON: see to_dict() / from_dict(); evaluate, predict and
    Grad-CAM repeat exactly the preprocessing a model was trained with.
    """
    size: int = 224
    resize: str = "pad"
    lungs: str = "none"
    lung_margin: float = 0.08
    intensity: str = "none"

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise DataError(f"Preprocess size={self.size!r}: expected a positive integer number of pixels")
        if self.resize not in RESIZE_MODES:
            raise DataError(f"Preprocess resize={self.resize!r}: expected one of {', '.join(RESIZE_MODES)}")
        error = views_error(self.lungs, self.intensity)
        if error:
            raise DataError(f"Preprocess {error}")
        if len(self.views) == 1:                      # "none-window" -> lungs "none", intensity "window"
            (lungs, intensity), = self.views
            object.__setattr__(self, "lungs", lungs)
            object.__setattr__(self, "intensity", intensity)
        if not 0 <= self.lung_margin <= 1:
            raise DataError(f"Preprocess lung_margin={self.lung_margin!r}: expected a fraction in [0, 1]")
        object.__setattr__(self, "size", int(self.size))

    @property
    def views(self) -> tuple[tuple[str, str], ...]:
        """(lungs, intensity) of each input channel: (("none", "none"),) for a plain slice."""
        return view_pairs(self.lungs, self.intensity)

    @property
    def frame_views(self) -> tuple[int, ...]:
        """The channels cut like channel 0 (the same lungs mode: their pixels lie in one frame)."""
        return tuple(index for index, (lungs, _) in enumerate(self.views) if lungs == self.views[0][0])

    def view(self, index: int) -> "Preprocess":
        """The single-channel preprocessing of channel ``index``."""
        lungs, intensity = self.views[index]
        return replace(self, lungs=lungs, intensity=intensity)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        known = {"size", "resize", "lungs", "lung_margin", "intensity"}
        unknown = set(d) - known
        if unknown:
            raise DataError(f"Preprocess settings: unknown keys {sorted(unknown)}; expected {', '.join(sorted(known))}")
        return cls(**d)

    def key(self) -> str:
        """Short stable hash of the settings (and of the decoding rule version)."""
        settings = {"v": CACHE_VERSION, **self.to_dict()}
        if self.intensity == "none":
            del settings["intensity"]          # keeps the cache keys of earlier versions
        if any(lungs != "none" or intensity == "window" for lungs, intensity in self.views):   # uses the mask
            from .lungs import LUNGS_VERSION
            settings["lungs_v"] = LUNGS_VERSION
        text = json.dumps(settings, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def check_min_size(self, min_size: int | None) -> None:
        """DataError if size is below the smallest input the model accepts."""
        if min_size is not None and self.size < min_size:
            raise DataError(f"Preprocess size={self.size} is below the minimum image size {min_size} "
                            f"the model needs; use size >= {min_size}")


# ------------------------------------------------------------------ decoding
def to_gray(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> float32 (h, w) in [0, 1] (rule in the module docstring)."""
    mode = image.mode
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    elif mode == "RGBa":
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode == "La":
        image, mode = image.convert("LA"), "LA"

    if mode == "1":
        return np.asarray(image, dtype=np.float32)
    if mode == "L":
        return np.asarray(image, dtype=np.float32) / 255.0
    if mode.startswith("I;16") or mode == "I":
        gray = np.asarray(image).astype(np.float32) / 65535.0
        return np.clip(gray, 0.0, 1.0)
    if mode == "F":
        return np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0.0, 1.0)
    if mode == "LA":
        la = np.asarray(image, dtype=np.float32) / 255.0
        return la[..., 0] * la[..., 1]
    if mode == "RGBA":
        rgba = np.asarray(image, dtype=np.float32) / 255.0
        return _luma(rgba[..., :3]) * rgba[..., 3]
    if mode != "RGB":                      # CMYK, YCbCr, LAB, HSV, RGBX, ...
        image = image.convert("RGB")
    return _luma(np.asarray(image, dtype=np.float32) / 255.0)


def _luma(rgb: np.ndarray) -> np.ndarray:
    r, g, b = RGB_WEIGHTS
    gray = r * rgb[..., 0] + g * rgb[..., 1] + b * rgb[..., 2]
    return np.clip(gray, 0.0, 1.0).astype(np.float32)


def _content_place(shape, pre: Preprocess) -> tuple[int, int, int, int]:
    """Where _resize puts a (h, w) slice on its (size, size) output: (new_h, new_w, top, left)."""
    h, w = shape
    s = pre.size
    if pre.resize == "stretch":
        return s, s, 0, 0
    scale = s / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    return new_h, new_w, (s - new_h) // 2, (s - new_w) // 2


def _resize(gray: np.ndarray, pre: Preprocess) -> tuple[np.ndarray, tuple[int, int]]:
    """(h, w) -> (size, size) float32; also returns the (h, w) the content got."""
    s = pre.size
    new_h, new_w, top, left = _content_place(gray.shape, pre)
    # Bilinear with PIL's antialiasing (its filter widens when shrinking), in float.
    source = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))      # mode "F"
    resized = np.asarray(source.resize((new_w, new_h), Image.BILINEAR))
    resized = np.clip(resized, 0.0, 1.0)
    if (new_h, new_w) == (s, s):
        return resized.astype(np.float32), (new_h, new_w)
    canvas = np.zeros((s, s), np.float32)
    canvas[top:top + new_h, left:left + new_w] = resized
    return canvas, (new_h, new_w)


class PixelBudget:
    """At most ``limit`` pixels held by the blocks inside ``hold`` at once, over all threads.

    A request that does not fit waits until enough is released; one larger than the whole
    limit waits until it is alone, so it always runs eventually.
    """

    def __init__(self, limit: int):
        self.limit, self.in_use = limit, 0
        self.changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        with self.changed:
            while self.in_use and self.in_use + pixels > self.limit:
                self.changed.wait()
            self.in_use += pixels
        try:
            yield
        finally:
            with self.changed:
                self.in_use -= pixels
                self.changed.notify_all()


_decode_budget = PixelBudget(DECODE_BUDGET_PIXELS)


def _check_finite(image: Image.Image, path: str) -> None:
    """Float images (mode F): refuse all-NaN/inf, warn about some NaN/inf (read as 0)."""
    if image.mode != "F":
        return
    bad = ~np.isfinite(np.asarray(image, dtype=np.float32))
    if bad.all():
        raise DataError(f"{path}: every pixel is NaN or infinite; the float image holds no picture")
    if bad.any():
        warnings.warn(f"{path}: {int(bad.sum())} of {bad.size} pixels are NaN or infinite; read as 0", stacklevel=2)


def _decode_bytes(data: bytes, path: str, pre: Preprocess) -> tuple[np.ndarray, tuple[int, int], bool]:
    """File bytes -> ((views, size, size) float32, content (h, w) after resize, lungs found), or DataError
    naming `path`. "lungs found" is True unless pre.lungs asked for a crop and the mask was implausible."""
    gray = _gray_from_bytes(data, path)
    with _decode_budget.hold(gray.size):
        return prepare_gray(gray, pre)


def read_gray(path) -> np.ndarray:
    """One image file -> its whole slice as float32 (h, w) in [0, 1], before any crop or resize."""
    return _gray_from_bytes(_read_bytes(str(path)), str(path))


def _gray_from_bytes(data: bytes, path: str) -> np.ndarray:
    """File bytes -> float32 (h, w) in [0, 1] (the to_gray rule), or DataError naming `path`."""
    if len(data) == 0:
        raise DataError(f"{path}: empty file (0 bytes), not an image")
    try:
        with Image.open(io.BytesIO(data)) as image:              # reads the header only
            w, h = image.size
            if w < 1 or h < 1:
                raise DataError(f"{path}: zero-size image ({w}x{h} px)")
            if w * h > MAX_PIXELS:
                raise DataError(f"{path}: {w}x{h} = {w * h:,} pixels, more than the limit of {MAX_PIXELS:,}; "
                                f"downscale it, or raise the limit with covidct --max-pixels N")
            with _decode_budget.hold(w * h):
                image.load()
                _check_finite(image, path)
                gray = to_gray(image)
    except DataError:
        raise
    except UnidentifiedImageError as error:
        png_size = _png_header_size(data)
        if png_size is not None and min(png_size) == 0:
            raise DataError(f"{path}: zero-size image ({png_size[0]}x{png_size[1]} px)") from error
        raise DataError(f"{path}: not a readable image (cannot identify image file)") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: corrupt or truncated image ({reason})") from error
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise DataError(f"{path}: zero-size image ({gray.shape})")
    return gray


def prepare_gray(gray: np.ndarray, pre: Preprocess) -> tuple[np.ndarray, tuple[int, int], bool]:
    """A gray slice (h, w) in [0, 1] -> ((views, size, size) float32, content (h, w) after resize, lungs
    found): the lung-field cut that pre.lungs asks for, then the resize; one channel per view. Every
    input (PNG, JPEG, DICOM, NIfTI slice) goes through here after its conversion to gray."""
    if len(pre.views) > 1:                      # one channel per view; content size of the first
        outputs = [prepare_gray(gray, pre.view(index)) for index in range(len(pre.views))]
        return (np.concatenate([image for image, _, _ in outputs]), outputs[0][1],
                all(found for _, _, found in outputs))
    gray, lungs_found = _cut_to_lungs(_calibrated(gray, pre), pre)
    if pre.intensity == "equalize":
        gray = equalize(gray)
    image_out, content_hw = _resize(gray, pre)
    return image_out[None], content_hw, lungs_found


def _calibrated(gray: np.ndarray, pre: Preprocess) -> np.ndarray:
    """The whole slice as float32, window-calibrated when the (single-view) pre asks for it: calibration
    comes before the lung cut, as it needs the lungs and the body (prepare_gray, frame_boxes)."""
    gray = np.asarray(gray, np.float32)
    return window_calibrate(gray) if pre.intensity == "window" else gray


def frame_boxes(gray: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Where each channel's picture of a whole gray slice (h, w) lies in channel 0's input, which shows
    the whole slice: float64 (views, 4) of (top, bottom, left, right) in input pixels. A lung crop's
    row is its box (covidct.lungs.crop_box, found as prepare_gray finds it), the other rows the whole
    slice's place; all NaN when channel 0 is itself a crop (no common frame). Grad-CAM pastes a crop
    member's heatmap into that box (covidct.gradcam)."""
    from .lungs import crop_box, find_lungs

    gray = np.asarray(gray, np.float32)
    boxes = np.full((len(pre.views), 4), np.nan)
    if pre.views[0][0] != "none":
        return boxes
    new_h, new_w, top, left = _content_place(gray.shape, pre)
    scale_y, scale_x = new_h / gray.shape[0], new_w / gray.shape[1]
    for index, (lungs, _) in enumerate(pre.views):
        box = (0, gray.shape[0], 0, gray.shape[1])
        if lungs != "none":                      # the lungs as prepare_gray finds them before its cut
            seen = _calibrated(gray, pre.view(index))
            box = crop_box(find_lungs(seen), gray.shape, pre.lung_margin)
        y0, y1, x0, x1 = box
        boxes[index] = top + y0 * scale_y, top + y1 * scale_y, left + x0 * scale_x, left + x1 * scale_x
    return boxes


LUNG_GRAY, SOFT_TISSUE_GRAY = 0.15, 0.6    # where window_calibrate puts the two tissues' medians


def window_calibrate(gray: np.ndarray) -> np.ndarray:
    """Map a (h, w) slice in [0, 1] linearly so that its lungs' median gray becomes LUNG_GRAY and its
    soft tissue's median SOFT_TISSUE_GRAY, clipped to [0, 1]:

        out = LUNG_GRAY + (SOFT_TISSUE_GRAY - LUNG_GRAY) * (gray - lung) / (tissue - lung)

    lung: median inside the lung mask (covidct.lungs.find_lungs); tissue: median of the pixels
    brighter than the slice's Otsu threshold outside that mask (muscle, fat, mediastinum, and a
    little bone). Why: COVID-CT's slices are paper figures shown with many windows; a CT scanner's
    Hounsfield scale would put both tissues at fixed values, and this puts them at fixed grays.
    A slice without a plausible lung mask, without tissue, or whose two medians are within 0.05 of
    each other (a saturated window) is returned unchanged."""
    from .lungs import find_lungs, otsu_threshold

    lungs = find_lungs(gray)
    if not lungs.found:
        return gray
    tissue = gray[(gray > otsu_threshold(gray)) & ~lungs.mask]
    if tissue.size < 50:
        return gray
    lung_gray, tissue_gray = float(np.median(gray[lungs.mask])), float(np.median(tissue))
    if tissue_gray - lung_gray < 0.05:
        return gray
    scale = (SOFT_TISSUE_GRAY - LUNG_GRAY) / (tissue_gray - lung_gray)
    return np.clip(LUNG_GRAY + scale * (gray - lung_gray), 0.0, 1.0).astype(np.float32)


def equalize(gray: np.ndarray, levels: int = 256) -> np.ndarray:
    """Histogram equalisation of a (h, w) slice in [0, 1]: each pixel becomes the share of
    the slice's pixels that are darker than or as dark as it (its gray level's cumulative
    histogram, over ``levels`` levels). Order-preserving, so anatomy keeps its shape; the
    darkest level maps to 0 (air stays black, as the resize's padding)."""
    gray = np.asarray(gray, np.float32)
    level = np.minimum((gray * levels).astype(np.int64), levels - 1)      # (h, w) in 0..levels-1
    counts = np.bincount(level.ravel(), minlength=levels)
    below = np.cumsum(counts) - counts[level.min()]                          # pixels above the darkest level
    if below[-1] <= 0:                                                       # a flat slice: nothing to spread
        return gray
    return (below / below[-1]).astype(np.float32)[level]


def _cut_to_lungs(gray: np.ndarray, pre: Preprocess) -> tuple[np.ndarray, bool]:
    """(h, w) -> the lung-field crop that pre.lungs asks for (covidct.lungs), and whether lungs were found."""
    if pre.lungs == "none":
        return gray, True
    from .lungs import crop_to_lungs, find_lungs

    lungs = find_lungs(gray)
    return crop_to_lungs(gray, lungs, pre.lung_margin, blank_outside=pre.lungs == "mask"), lungs.found


def input_lung_mask(gray: np.ndarray, pre: Preprocess) -> np.ndarray | None:
    """The lung fields of a whole gray slice (h, w) in the geometry of its model input: bool
    (size, size), or None where the mask is implausible. The mask is found on the whole slice
    (covidct.lungs) and then cut and resized exactly as the image is (prepare_gray), so it stays
    right for lung-cropped inputs. Several views: the first channel's geometry."""
    from .lungs import crop_to_lungs, find_lungs

    pre = pre.view(0)
    lungs = find_lungs(gray)
    if not lungs.found:
        return None
    mask = lungs.mask.astype(np.float32)
    if pre.lungs != "none":
        mask = crop_to_lungs(mask, lungs, pre.lung_margin)
    return _resize(mask, pre)[0] > 0.5


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG header (PIL refuses to open a 0-pixel PNG), else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _check_content_size(path: str, content_hw, pre: Preprocess, min_size: int | None) -> None:
    """DataError if the resized image (without padding) is thinner than min_size."""
    ch, cw = content_hw
    if min_size is not None and min(ch, cw) < min_size:
        raise DataError(f"{path}: after resize ({pre.resize}, size={pre.size}) the image content is "
                        f"{cw}x{ch} px, smaller than the minimum {min_size} px")


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an image file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read file ({error.strerror or error})") from None


def load_image(path, preprocess: Preprocess = Preprocess(), min_size: int | None = None) -> np.ndarray:
    """One image file -> float32 (1, H, W) in [0, 1] with H = W = preprocess.size ((views, H, W) for
    several lung views).

    min_size: smallest content size (px) accepted after resizing; in "pad" mode a
    very wide or very tall image can end up thinner than that -> DataError.
    """
    preprocess.check_min_size(min_size)
    path = str(path)
    image, content_hw, _ = _decode_bytes(_read_bytes(path), path, preprocess)
    _check_content_size(path, content_hw, preprocess, min_size)
    return image


# ------------------------------------------------------------------ caching
# Both caches map (hash of the file's bytes, Preprocess.key()) -> (image, content (h, w), lungs found).
_memory_cache: dict[tuple[str, str], tuple[np.ndarray, tuple[int, int], bool]] = {}
_memory_lock = threading.Lock()


def clear_memory_cache() -> None:
    """Forget the decoded images kept in memory (the on-disk cache stays)."""
    with _memory_lock:
        _memory_cache.clear()


def _remember(key, entry) -> None:
    image = entry[0]
    with _memory_lock:
        if key in _memory_cache or image.nbytes > MEMORY_CACHE_BYTES:
            return
        used = sum(e[0].nbytes for e in _memory_cache.values())
        while _memory_cache and used + image.nbytes > MEMORY_CACHE_BYTES:
            oldest = next(iter(_memory_cache))           # dicts keep insertion order: FIFO
            used -= _memory_cache.pop(oldest)[0].nbytes
        _memory_cache[key] = entry


def _disk_cache_file(cache_dir: Path, pre_key: str, content_hash: str) -> Path:
    return cache_dir / f"images-{pre_key}" / content_hash[:2] / f"{content_hash}.npz"


# np.load parses each array's header with ast.literal_eval, and CPython 3.11's AST construction is not
# thread-safe (a rare "SystemError: AST constructor recursion depth mismatch" when the loader's threads
# read cache entries at once; python/cpython#106905): one reader at a time. The reads are short.
_npz_read_lock = threading.Lock()


def _load_cached(file: Path, shape: tuple[int, int, int]):
    try:
        with _npz_read_lock, np.load(file, allow_pickle=False) as npz:
            image, content_hw, lungs_found = npz["image"], npz["content_hw"], npz["lungs_found"]
    except (OSError, ValueError, KeyError, EOFError):  # absent or damaged entry: decode again
        return None
    if image.shape != shape or image.dtype != np.float32 or content_hw.shape != (2,):
        return None
    return image, (int(content_hw[0]), int(content_hw[1])), bool(lungs_found)


def _save_cached(file: Path, entry) -> None:
    """np.savez to a temp file in the same folder, then os.replace (atomic)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, image=entry[0], content_hw=np.asarray(entry[1], np.int64), lungs_found=np.bool_(entry[2]))
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_one(path: str, pre: Preprocess, cache_dir: Path | None, min_size: int | None):
    """Memory cache -> disk cache -> decode (and fill both caches)."""
    data = _read_bytes(path)
    content_hash = hashlib.sha1(data).hexdigest()          # identity, not security
    key = (content_hash, pre.key())
    with _memory_lock:
        entry = _memory_cache.get(key)
    cache_file = _disk_cache_file(cache_dir, key[1], content_hash) if cache_dir is not None else None
    if entry is None and cache_file is not None:
        entry = _load_cached(cache_file, (len(pre.views), pre.size, pre.size))
        if entry is not None:
            _remember(key, entry)
    if entry is None:
        entry = _decode_bytes(data, path, pre)
        _remember(key, entry)
        if cache_file is not None:
            _save_cached(cache_file, entry)
    _check_content_size(path, entry[1], pre, min_size)
    return entry


def load_images(dataset, preprocess: Preprocess = Preprocess(), cache_dir=None, skip_bad: bool = False,
                progress: bool = False, min_size: int | None = None, skipped_log=None,
                workers: int | None = None, stats: dict | None = None):
    """Decode every image of a Dataset -> (images (N, 1, H, W) float32, labels (N,) int64, paths);
    (N, views, H, W) for several lung views (Preprocess.lungs).

    cache_dir:   folder for the on-disk cache (one .npz per image, keyed by a hash of
                 the file's bytes and the preprocessing settings), or None. Decoded
                 images are also kept in memory for the life of the process.
    skip_bad:    False: the first bad image stops with a DataError naming it.
                 True: bad images are left out, one warning gives the count, and
                 "path<TAB>reason" lines go to `skipped_log` (default:
                 cache_dir/skipped_files.txt, or a file in the system temp folder).
    min_size:    smallest image size (px) the model accepts; see load_image.
    workers:     decoding threads (default: up to 8, one per CPU).
    stats:       a dict to fill with {"images", "skipped", "lung_fallbacks"} (slices whose
                 lung mask was implausible and were kept whole; see Preprocess.lungs).
    """
    preprocess.check_min_size(min_size)
    paths = [str(p) for p in dataset.paths]
    labels = np.asarray(dataset.labels, dtype=np.int64)
    if len(paths) == 0:
        raise DataError(f"{getattr(dataset, 'source', '') or 'dataset'}: no images to load")
    cache_path = Path(cache_dir) if cache_dir is not None else None
    if cache_path is not None:
        cache_path.mkdir(parents=True, exist_ok=True)

    def work(path):
        try:
            return _load_one(path, preprocess, cache_path, min_size), None
        except DataError as error:
            return None, str(error)

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(work, paths)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(paths), desc="loading images", unit="img")
        results = list(results)

    images, kept, skipped, fallbacks = [], [], [], 0
    for i, (entry, error) in enumerate(results):
        if error is None:
            images.append(entry[0])
            fallbacks += not entry[2]
            kept.append(i)
        elif not skip_bad:
            raise DataError(error)
        else:
            skipped.append((paths[i], error))
    if stats is not None:
        stats.update(images=len(kept), skipped=len(skipped), lung_fallbacks=fallbacks)
    if skipped:
        log = _write_skipped(skipped, skipped_log, cache_path)
        warnings.warn(f"skipped {len(skipped)} of {len(paths)} images that could not be used; "
                      f"the list with reasons is in {log}", stacklevel=2)
        if not kept:
            raise DataError(f"all {len(paths)} images were bad; none left to load (see {log})")
        for label in np.unique(labels):
            if not np.any(labels[kept] == label):
                raise DataError(f"every image of class {label} was bad; a class would be empty (see {log})")
    return np.stack(images), labels[kept], [paths[i] for i in kept]


def _write_skipped(skipped, skipped_log, cache_path) -> str:
    if skipped_log is None:
        if cache_path is not None:
            skipped_log = cache_path / "skipped_files.txt"
        else:
            fd, skipped_log = tempfile.mkstemp(prefix="covidct-skipped-", suffix=".txt")
            os.close(fd)
    lines = [f"{path}\t{reason.removeprefix(path + ': ')}" for path, reason in skipped]
    Path(skipped_log).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(skipped_log)


# ------------------------------------------------------------------ normalisation
def compute_normalization(images) -> tuple[float, float]:
    """Mean and standard deviation of all pixels, (N, 1, H, W) -> (mean, std).

    Compute it on the TRAINING images only and reuse it for val/test.
    """
    images = np.asarray(images)
    if images.size == 0:
        raise DataError("compute_normalization: no images (empty array)")
    mean = float(images.mean(dtype=np.float64))
    std = float(images.std(dtype=np.float64))
    if not np.isfinite(std) or std <= 0:
        raise DataError(f"compute_normalization: images have standard deviation {std}; "
                        f"expected > 0 (are all images blank?)")
    return mean, std


def normalize(images, mean: float, std: float):
    """(images - mean) / std as float32; a new array, same shape, NumPy or CuPy."""
    if std <= 0:
        raise DataError(f"normalize: std={std}, expected > 0")
    return ((images - np.float32(mean)) / np.float32(std)).astype(np.float32, copy=False)
