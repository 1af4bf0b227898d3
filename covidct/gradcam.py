"""Grad-CAM, feature maps and a rough lung-field mask, all with minicnn's own passes.

    gradcam(model, x, target_class=1, layer_index=None) -> heatmaps (N, H, W) in [0, 1]
    frame_boxes_of(model, preprocess, grays)             -> where an ensemble's lung crops lie (boxes=)
    default_layer_index(model)                           -> index of the Grad-CAM layer
    feature_maps(model, x)                               -> [(name, activation), ...]
    lung_mask(image)                                     -> bool (H, W)
    mass_inside(heatmap, mask)                           -> share of the heatmap's mass in the mask

Grad-CAM (Selvaraju et al., 2017). With A^k the k-th channel (h x w) of the target
layer's output and y^c the logit of class c (the logit, not the softmax):

    w_k = 1/(h*w) * sum_ij dy^c / dA^k_ij          (global-average-pooled gradient)
    cam = ReLU( sum_k w_k A^k )                      (h, w)

then cam is resized (bilinear) to the input size and divided by its maximum, so
each heatmap lies in [0, 1] (all zeros when no pixel has positive evidence).

The gradient comes from minicnn's hand-written backward passes: the Sequential
runs forward layer by layer, keeps A, and only the layers after the target
layer run backward, from a one-hot on the class logit. Nothing is trained: the
model runs in eval mode (its mode is restored afterwards), weights are not
touched, and every parameter's ``.grad`` is put back to what it was before the
call (None for a model that is not in the middle of a training step).

For an ensemble (covidct.ensemble) the heatmap is the mean of its members' heatmaps,
each member on its own normalisation of the input (and, with flip TTA, also on the
mirror image, its heatmap mirrored back), rescaled to a maximum of 1. A multi-view
ensemble's pictures show channel 0, the whole slice: the members reading it (in any gray
scale) give their heatmaps as they are, and a lung-crop member's heatmap lies in another
frame, so it is resized into the crop's box in the slice (``boxes``: covidct.preprocess.
frame_boxes, ``frame_boxes_of``) and is zero outside it; without boxes the crop members are
left out. Texture members (covidct.texture) have no heatmap.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

import minicnn as mc
from minicnn.models.resnet import BACKBONE, HEAD, ResNet

from .ensemble import Ensemble
from .errors import CovidCTError
from .lungs import lung_mask, otsu_threshold  # noqa: F401  (re-exported)

RESNET_STAGES = list(BACKBONE) + list(HEAD)

__all__ = ["gradcam", "default_layer_index", "feature_maps", "lung_mask", "otsu_threshold", "mass_inside",
           "mass_by_distance", "resize_map", "paste_map", "frame_boxes_of"]

# Layers after which the spatial layout is gone (a vector per image).
_TO_VECTOR = (mc.Flatten, mc.AdaptiveAvgPool2d)
_FEATURE_LAYERS = (mc.Conv2d, mc.MaxPool2d, mc.AdaptiveAvgPool2d)


def _layers(model) -> list:
    """The model's stages in forward order (a ResNet's: conv1, bn1, ..., layer4, avgpool, flatten, fc)."""
    if isinstance(model, ResNet):
        return [getattr(model, name) for name in RESNET_STAGES]
    if not isinstance(model, mc.Sequential):
        raise CovidCTError(f"Grad-CAM needs a minicnn Sequential model or a ResNet, got {type(model).__name__}")
    return list(model)


def default_layer_index(model) -> int:
    """Index of the last ReLU that directly follows a Conv2d or BatchNorm2d before the first
    Flatten / AdaptiveAvgPool2d: the last conv feature map (after its non-linearity).
    For a ResNet: the output of layer4 (its last residual block, after the ReLU)."""
    if isinstance(model, ResNet):
        return RESNET_STAGES.index("layer4")
    layers = _layers(model)
    stop = next((i for i, layer in enumerate(layers) if isinstance(layer, _TO_VECTOR)), len(layers))
    candidates = [i for i in range(1, stop) if isinstance(layers[i], mc.ReLU)
                  and isinstance(layers[i - 1], (mc.Conv2d, mc.BatchNorm2d))]
    if not candidates:
        raise CovidCTError("Grad-CAM: the model has no Conv2d/BatchNorm2d -> ReLU before its Flatten; "
                           "pass layer_index= explicitly")
    return candidates[-1]


def resize_map(array, size) -> np.ndarray:
    """(h, w) float -> (H, W) float32 by bilinear interpolation (PIL, float mode)."""
    height, width = size
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))
    return np.asarray(image.resize((int(width), int(height)), Image.BILINEAR), dtype=np.float32)


def _check_input(x) -> np.ndarray:
    if getattr(x, "ndim", None) != 4:
        raise CovidCTError(f"Grad-CAM: expected normalized images of shape (N, C, H, W), "
                           f"got shape {getattr(x, 'shape', type(x))}")
    return x


class _Quiet:
    """Eval mode and untouched gradients for the duration of a with-block."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.params = self.model.parameters()
        self.grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self.model.eval()
        return self

    def __exit__(self, *exc):
        for p, grad in zip(self.params, self.grads):
            p.grad = grad                       # None unless the caller had accumulated something
        self.model.release_saved()              # free what the forward kept for a backward never run
        self.model.train(self.was_training)
        return False


def gradcam(model, x, target_class=1, layer_index: int | None = None, batch_size: int = 32,
            return_logits: bool = False, features=None, boxes=None):
    """Grad-CAM heatmaps for normalized images x (N, C, H, W) -> float32 (N, H, W) in [0, 1].

    target_class: the class whose logit is explained, an int (default 1 = COVID) or one
                  per image (N,) (e.g. the predicted classes).
    layer_index:  index in the Sequential of the layer whose OUTPUT is A (default:
                  ``default_layer_index(model)``, the last conv block's ReLU).
    return_logits: also return the logits (N, num_classes) of the same forward pass.
    features:     an ensemble with texture members (covidct.ensemble): the slices' texture features,
                  for its logits (the heatmaps are its CNN members').
    boxes:        an ensemble with lung-crop members: where each channel lies in channel 0's frame,
                  (N, views, 4) from frame_boxes_of; its crop members' heatmaps are pasted there.
    """
    x = _check_input(x)
    if isinstance(model, Ensemble):
        return _ensemble_gradcam(model, x, target_class, layer_index, batch_size, return_logits, features, boxes)
    layers = _layers(model)
    index = default_layer_index(model) if layer_index is None else int(layer_index)
    if not 0 <= index < len(layers) - 1:
        raise CovidCTError(f"Grad-CAM: layer_index {layer_index} is outside 0..{len(layers) - 2}")
    n, _, height, width = x.shape
    targets = np.broadcast_to(np.asarray(target_class, dtype=np.int64), (n,))
    heatmaps = np.zeros((n, height, width), np.float32)
    all_logits = []
    with _Quiet(model):
        for start in range(0, n, batch_size):
            batch = x[start:start + batch_size]
            with mc.no_grad():                  # up to A: forward only, nothing kept
                activation = batch
                for layer in layers[:index + 1]:
                    activation = layer(activation)
            out = activation
            for layer in layers[index + 1:]:    # after A: kept for the backward to A
                out = layer(out)
            logits = out
            if logits.ndim != 2:
                raise CovidCTError(f"Grad-CAM: the model's output has shape {tuple(logits.shape)}, expected (N, classes)")
            batch_targets = targets[start:start + len(batch)]
            if batch_targets.min() < 0 or batch_targets.max() >= logits.shape[1]:
                raise CovidCTError(f"Grad-CAM: target_class {target_class} is not a class of this "
                                   f"{logits.shape[1]}-class model")
            xp = mc.get_array_module(logits)
            grad = xp.zeros_like(logits)
            grad[xp.arange(len(batch)), xp.asarray(batch_targets)] = 1    # d(logit_c)/d(logits)
            for layer in reversed(layers[index + 1:]):
                grad = layer.backward(grad)
            A, dA = mc.as_numpy(activation).astype(np.float64), mc.as_numpy(grad).astype(np.float64)
            if A.ndim != 4:
                raise CovidCTError(f"Grad-CAM: layer {index} ({type(layers[index]).__name__}) gives shape "
                                   f"{A.shape}, not a (N, C, h, w) feature map")
            weights = dA.mean(axis=(2, 3))                                     # (B, K)
            cams = np.maximum(np.einsum("bk,bkij->bij", weights, A), 0.0)      # (B, h, w)
            for j, cam in enumerate(cams):
                up = np.clip(resize_map(cam, (height, width)), 0.0, None)
                top = up.max()
                heatmaps[start + j] = up / top if top > 0 else 0.0
            all_logits.append(mc.as_numpy(logits))
    if return_logits:
        return heatmaps, np.concatenate(all_logits)
    return heatmaps


def _ensemble_gradcam(ensemble, x, target_class, layer_index, batch_size, return_logits, features=None,
                      boxes=None):
    """The mean of the members' heatmaps in channel 0's frame (x identity-normalised, as the ensemble
    takes it): the members reading a channel in that frame (``Ensemble.frame_views``: the whole slice,
    however its gray scale is shown) as they are, the lung-crop members' pasted into their boxes
    when boxes (N, views, 4) are given, else left out."""
    xp = mc.get_array_module(x)
    total = np.zeros((x.shape[0],) + tuple(x.shape[2:]), np.float64)
    for index, member in enumerate(ensemble.members):
        in_frame = ensemble.views is None or ensemble.views[index] in ensemble.frame_views
        if not in_frame and (boxes is None or np.isnan(boxes[:, ensemble.views[index]]).any()):
            continue
        for mirrored in ((False, True) if ensemble.tta else (False,)):
            view = xp.ascontiguousarray(x[..., ::-1]) if mirrored else x
            heatmaps = gradcam(member, ensemble.member_input(view, index), target_class, layer_index, batch_size)
            heatmaps = heatmaps[..., ::-1] if mirrored else heatmaps
            if not in_frame:
                heatmaps = [paste_map(heatmap, box, total.shape[1:])
                            for heatmap, box in zip(heatmaps, boxes[:, ensemble.views[index]])]
            total += heatmaps
    top = total.max(axis=(1, 2), keepdims=True)
    heatmaps = (total / np.where(top > 0, top, 1.0)).astype(np.float32)
    if not return_logits:
        return heatmaps
    with _Quiet(ensemble), mc.no_grad():
        logits = np.concatenate([mc.as_numpy(ensemble(x[start:start + batch_size],
                                                      None if features is None else features[start:start + batch_size]))
                                 for start in range(0, len(x), batch_size)])
    return heatmaps, logits


def paste_map(heatmap, box, size) -> np.ndarray:
    """A heatmap (h, w) of a crop, resized (bilinear) into its box (top, bottom, left, right) on a zero
    (H, W) canvas: the crop's heat where the crop lies in the whole slice."""
    top, bottom, left, right = np.rint(box).astype(int)
    top, left = max(0, top), max(0, left)
    bottom, right = min(size[0], max(bottom, top + 1)), min(size[1], max(right, left + 1))
    canvas = np.zeros(size, np.float32)
    canvas[top:bottom, left:right] = resize_map(heatmap, (bottom - top, right - left))
    return canvas


def frame_boxes_of(model, preprocess, grays):
    """(N, views, 4): covidct.preprocess.frame_boxes of each whole gray slice of ``grays`` (an iterable),
    for gradcam's ``boxes``, when model is an ensemble with a member outside channel 0's frame (a lung
    crop), else None (no time spent)."""
    from .preprocess import frame_boxes

    if not isinstance(model, Ensemble) or model.views is None or set(model.views) <= set(model.frame_views):
        return None
    return np.stack([frame_boxes(gray, preprocess) for gray in grays])


def feature_maps(model, x) -> list[tuple[str, np.ndarray]]:
    """Every Conv2d and pooling output for normalized images x (N, C, H, W), in eval mode.

    -> [("0 Conv2d", (N, F, h, w)), ("2 MaxPool2d", ...), ...]; names are "<index> <layer type>".
    Stops at the first Flatten (the classifier head is not a feature map). An ensemble shows its
    first member's, on that member's normalisation ("member0.0 Conv2d", ...).
    """
    x = _check_input(x)
    if isinstance(model, Ensemble):
        first = feature_maps(model.members[0], model.member_input(x, 0))
        return [(f"member0.{name}", activation) for name, activation in first]
    maps = []
    with _Quiet(model), mc.no_grad():
        out = x
        for i, layer in enumerate(_layers(model)):
            if isinstance(layer, mc.Flatten):
                break
            out = layer(out)
            if isinstance(layer, _FEATURE_LAYERS):
                maps.append((f"{i} {type(layer).__name__}", np.array(mc.as_numpy(out))))
    return maps


# ------------------------------------------------------------------ lung mask
# lung_mask and otsu_threshold live in covidct.lungs (imported above; kept in __all__ for old callers).


def mass_inside(heatmap, mask) -> float:
    """Share of the heatmap's total mass that falls inside the mask (nan for an all-zero heatmap)."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    total = heatmap.sum()
    return float(heatmap[np.asarray(mask, bool)].sum() / total) if total > 0 else float("nan")


DISTANCE_BANDS = (1, 3, 6, 12)     # band edges in input pixels outside the mask (0 = inside)


def mass_by_distance(heatmap, mask, edges=DISTANCE_BANDS) -> tuple[np.ndarray, np.ndarray]:
    """Where the heat lies relative to a mask: (heat share, area share) per band of distance from it,
    bands [inside, (0, e1], (e1, e2], ..., > e_last] in pixels (nan heat for an all-zero heatmap).
    Heat shares equal to the area shares mean a heatmap spread evenly; heat outside that hugs the
    mask (the first bands) is evidence on the mask's edge, far bands the image's corners and borders."""
    from scipy import ndimage

    heatmap, mask = np.asarray(heatmap, dtype=np.float64), np.asarray(mask, bool)
    distance = ndimage.distance_transform_edt(~mask)                  # 0 inside the mask
    band = np.digitize(distance, edges, right=True) + (distance > 0)  # 0 inside, 1 for (0, e1], ...
    count = len(edges) + 2
    area = np.bincount(band.ravel(), minlength=count) / band.size
    total = heatmap.sum()
    heat = np.bincount(band.ravel(), weights=heatmap.ravel(), minlength=count) / total if total > 0 \
        else np.full(count, np.nan)
    return heat, area
