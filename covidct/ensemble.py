"""Ensembles: several trained models (fold models, seeds, views) used as one, with optional flip TTA.

    save_ensemble(path, member_checkpoints, threshold, tta=False)   -> one .npz checkpoint
    Ensemble(models, normalizations, tta, views, combine)          -> an mc.Module
    combine_probabilities(p_covid (M, N), combine)                 -> (N,) P(COVID) of the ensemble

An ensemble checkpoint holds each member's weights (``member<i>.model.<name>``)
and metadata; ``covidct.checkpoint.load_checkpoint`` rebuilds it as an Ensemble
that ``evaluate`` and ``predict`` use like a single model.

How the members' probabilities p_1 ... p_K (K = members x TTA views) become one:

    combine="geometric" (ensembles saved since session 7): the normalised geometric mean,
        log p(x) = 1/K sum_k log softmax(f_k(x)) - logsumexp(...)   (2 classes: the mean log-odds)
    combine="mean" (older checkpoints, which do not name a rule): the arithmetic mean,
        p(x) = 1/K sum_k softmax(f_k(x))

Cross-validated on COVID-CT, the geometric mean ranks better when members disagree in
confidence (whole slice + lung crop: OOF AUC 0.844 against 0.838; README).

Views: members may read different channels of a multi-view input (Preprocess lungs
"none,crop": channel 0 the whole slice, channel 1 its lung crop); ``views[i]`` is member
i's channel. Without views every member reads the whole (1-channel) input.

The Ensemble returns log p as its "logits", so softmax(log p) = p and every caller
that applies a softmax gets the combined probabilities back unchanged. Each member
normalises the [0, 1] input with its own training statistics, so the checkpoint's
own normalisation is the identity (mean 0, std 1).

Texture members (covidct.texture.TextureMember, in the default recipe): logistic regressions on
each slice's lung-texture features, computed from the slice itself at 224 px (not from the
CNNs' input), so the ensemble then takes them beside the pixels: ``forward(x, features)``,
features (N, 94 x T) from covidct.texture.texture_inputs(model, paths): 94 per texture member, on
its own gray scale (``TextureMember.intensity``), in order (``reads_texture(model)`` says whether a
model needs them). Each texture member is one more member of the combination, weighing as much as a
CNN member with its mirror images.

Grad-CAM (covidct.gradcam) averages the heatmaps of the CNN members that read a channel cut
like channel 0 (the picture that is shown, however its gray scale is calibrated; a lung crop's
heatmap lies in another frame); ONNX export
(covidct.export) writes the same combination as one graph (ensembles without texture members).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import minicnn as mc

from .errors import CovidCTError

__all__ = ["Ensemble", "save_ensemble", "build_ensemble", "combine_probabilities", "reads_texture", "COMBINE_RULES"]

KIND = "ensemble"
COMBINE_RULES = ("mean", "geometric")


def combine_probabilities(p_covid, combine: str = "geometric") -> np.ndarray:
    """Members' P(COVID) (M, N) -> the ensemble's (N,): arithmetic mean, or the normalised geometric
    mean (for two classes: the sigmoid of the mean log-odds), as Ensemble.forward combines them."""
    p = np.clip(np.asarray(p_covid, np.float64), 1e-12, 1 - 1e-12)
    if combine == "mean":
        return p.mean(axis=0)
    if combine != "geometric":
        raise CovidCTError(f"ensemble combine rule {combine!r}: expected one of {', '.join(COMBINE_RULES)}")
    log_odds = np.log(p).mean(axis=0) - np.log1p(-p).mean(axis=0)
    return 1.0 / (1.0 + np.exp(-log_odds))


def reads_texture(model) -> bool:
    """Does this model take lung-texture features beside the pixels (an Ensemble with texture members)?"""
    return isinstance(model, Ensemble) and bool(model.textures)


class Ensemble(mc.Module):
    """Several models as one (inference only): their probabilities combined by ``combine`` ("mean", or
    "geometric": the normalised geometric mean), member i reading input channel ``views[i]`` when the
    input holds several views. Members are the attributes member0, member1, ..., so state_dict names
    are ``member<i>.<name>``; texture members (covidct.texture.TextureMember) texture0, texture1, ...
    ``frame_views``: the channels whose pixels lie where channel 0's do (the whole slice, whatever its
    gray scale; a lung crop lies elsewhere): Grad-CAM draws their members."""

    def __init__(self, models, normalizations, tta: bool = False, views=None, combine: str = "mean",
                 frame_views=(0,), textures=()):
        if not models:
            raise CovidCTError("an ensemble needs at least one model")
        if combine not in COMBINE_RULES:
            raise CovidCTError(f"ensemble combine rule {combine!r}: expected one of {', '.join(COMBINE_RULES)}")
        if views is not None and len(views) != len(models):
            raise CovidCTError(f"an ensemble of {len(models)} models got {len(views)} view indices")
        for i, model in enumerate(models):
            setattr(self, f"member{i}", model)
        for i, texture in enumerate(textures):
            setattr(self, f"texture{i}", texture)
        self.normalizations = [(float(m), float(s)) for m, s in normalizations]
        self.tta = tta
        self.views = None if views is None else [int(v) for v in views]
        self.combine = combine
        self.frame_views = [int(v) for v in frame_views]   # channels in channel 0's frame: Grad-CAM draws them

    @property
    def members(self):
        """The CNN members, in order."""
        return [module for name, module in self.named_children() if name.startswith("member")]

    @property
    def textures(self):
        """The texture members (covidct.texture.TextureMember), in order."""
        return [module for name, module in self.named_children() if name.startswith("texture")]

    def member_input(self, x, index: int):
        """x (in [0, 1], identity-normalised) -> member ``index``'s channel, on its own normalisation."""
        if self.views is not None:
            view = self.views[index]
            if x.ndim != 4 or x.shape[1] <= view:
                raise CovidCTError(f"this ensemble reads one channel per view ({max(self.views) + 1} views, "
                                   f"Preprocess lungs/intensity lists); got input of shape {tuple(x.shape)}")
            x = x[:, view:view + 1]                                          # (N, 1, H, W)
        mean, std = self.normalizations[index]
        return (x - np.float32(mean)) / np.float32(std)

    def forward(self, x, features=None):
        """x: (N, C, H, W) in [0, 1] (identity-normalised), features: (N, 94 x T) lung-texture features of
        the same slices, 94 per texture member (covidct.texture.texture_inputs; only for an ensemble with
        T texture members) -> log of the combined probability (N, classes)."""
        from .texture import N_FEATURES, gray_scale_features

        xp = mc.get_array_module(x)
        width = N_FEATURES * len(self.textures)
        if self.textures and (features is None or np.shape(features) != (len(x), width)):
            raise CovidCTError(f"this ensemble has {len(self.textures)} lung-texture member(s): give the "
                               f"{len(x)} slices' texture features beside their pixels, shape ({len(x)}, {width}) "
                               f"(covidct.texture.texture_inputs)")
        flips = [x, xp.ascontiguousarray(x[..., ::-1])] if self.tta else [x]
        total = 0.0
        for index, model in enumerate(self.members):
            for flip in flips:
                logits = model(self.member_input(flip, index))
                shifted = logits - logits.max(axis=1, keepdims=True)
                log_probs = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
                total = total + (log_probs if self.combine == "geometric" else xp.exp(log_probs))
        features = mc.as_numpy(features) if self.textures else None       # texture members run on the host
        for index, texture in enumerate(self.textures):  # each weighs as one CNN member with its flips
            own = gray_scale_features(features, index)                      # (N, 94): its gray scale
            log_odds = np.asarray(texture(own), np.float64)[:, None]       # (N, 1)
            log_probs = -np.logaddexp(0.0, np.concatenate([log_odds, -log_odds], axis=1))  # log [1-p, p]
            log_probs = xp.asarray(log_probs.astype(np.float32))
            total = total + len(flips) * (log_probs if self.combine == "geometric" else xp.exp(log_probs))
        combined = total / ((len(self.normalizations) + len(self.textures)) * len(flips))   # mean log p, or mean p
        if self.combine == "geometric":                                     # renormalise: log softmax
            shifted = combined - combined.max(axis=1, keepdims=True)
            return (shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)
        return xp.log(xp.maximum(combined, np.float32(1e-30))).astype(np.float32)

    def backward(self, grad):
        raise CovidCTError("an ensemble is for inference only (evaluate, predict, Grad-CAM); "
                           "training takes one of its member checkpoints")


def save_ensemble(path, member_checkpoints, threshold: float, tta: bool = False, info: dict | None = None,
                  combine: str = "geometric", textures=()) -> Path:
    """Join member checkpoints into one ensemble checkpoint, written atomically. The members'
    preprocessing must agree except for the view (``lungs``, ``intensity``): members of different
    views make a multi-view ensemble whose input has one channel per view, in order of appearance
    (written as a product of modes, "none,crop" x "none,equalize", where the views make one, else
    view by view: "none-window,crop"). textures: fitted covidct.texture.TextureMember's to join too."""
    from .checkpoint import load_checkpoint, save_checkpoint

    from .preprocess import Preprocess, view_modes

    models, metas, shared, modes, views = [], [], None, {"lungs": [], "intensity": []}, []
    for member in member_checkpoints:
        model, meta = load_checkpoint(member)
        if meta.get("kind") == KIND:
            raise CovidCTError(f"{member}: is an ensemble itself; give the member checkpoints")
        preprocess = Preprocess.from_dict(meta["preprocess"])
        if len(preprocess.views) > 1:
            raise CovidCTError(f"{member}: reads several views itself; give single-view members")
        rest = {k: v for k, v in preprocess.to_dict().items() if k not in modes}
        shared = shared or rest
        if rest != shared:
            raise CovidCTError(f"{member}: preprocessing {meta['preprocess']} differs from the first member's "
                               f"{shared} in more than the view (lungs, intensity); an ensemble needs one "
                               f"preprocessing")
        for key, listed in modes.items():
            if getattr(preprocess, key) not in listed:
                listed.append(getattr(preprocess, key))
        view = (preprocess.lungs, preprocess.intensity)
        views += [view] if view not in views else []
        models.append(model)
        metas.append({**{k: meta[k] for k in ("model_config", "normalization", "epoch")}, "view": view})
    lungs, intensity = view_modes(views, *(",".join(listed) for listed in modes.values()))
    joined = Preprocess(**shared, lungs=lungs, intensity=intensity)
    for m in metas:                                   # (lungs, intensity) -> its channel of the joined input
        m["view"] = joined.views.index(m["view"])
    channels = [m["view"] for m in metas] if len(joined.views) > 1 else None
    from .texture import N_FEATURES, TEXTURE_VERSION, TEXTURE_VIEW

    ensemble = Ensemble(models, [(m["normalization"]["mean"], m["normalization"]["std"]) for m in metas], tta,
                        views=channels, combine=combine, frame_views=joined.frame_views, textures=textures)
    texture_metas = [{"version": TEXTURE_VERSION, "view": {**TEXTURE_VIEW, "intensity": t.intensity},
                      "features": N_FEATURES, "l2": t.l2} for t in textures]
    metadata = {"kind": KIND, "members": metas, "textures": texture_metas, "tta": bool(tta), "combine": combine,
                "threshold": float(threshold), "preprocess": joined.to_dict(),
                "normalization": {"mean": 0.0, "std": 1.0}, "model_config": metas[0]["model_config"],
                "metrics": info or {}}
    return save_checkpoint(path, ensemble, metadata)


def build_ensemble(metadata: dict) -> Ensemble:
    """An Ensemble with fresh members shaped as the checkpoint's metadata says (weights loaded after).
    Checkpoints written before views and combine rules existed: one view, arithmetic mean."""
    from .model import build_model, config_from_dict

    from .preprocess import Preprocess

    from .texture import N_FEATURES, TEXTURE_INTENSITIES, TEXTURE_VERSION, TextureMember

    members = metadata["members"]
    textures = metadata.get("textures", [])                 # ensembles saved before session 13: none
    for t in textures:
        if (not isinstance(t, dict) or t.get("version") != TEXTURE_VERSION or t.get("features") != N_FEATURES
                or not isinstance(t.get("view"), dict) or t["view"].get("intensity") not in TEXTURE_INTENSITIES):
            raise CovidCTError(f"ensemble texture member {t}: expected version {TEXTURE_VERSION} with "
                               f"{N_FEATURES} features on a gray scale of {', '.join(TEXTURE_INTENSITIES)} "
                               f"(this covidct's covidct.texture)")
    preprocess = Preprocess.from_dict(metadata["preprocess"])
    n_views = len(preprocess.views)
    for m in members:
        if not 0 <= int(m.get("view", 0)) < n_views:
            raise CovidCTError(f"ensemble member view {m.get('view')}: expected a channel index below {n_views}")
    multiview = n_views > 1
    return Ensemble([build_model(config_from_dict(m["model_config"])) for m in members],
                    [(m["normalization"]["mean"], m["normalization"]["std"]) for m in members],
                    tta=bool(metadata.get("tta", False)),
                    views=[int(m.get("view", 0)) for m in members] if multiview else None,
                    combine=metadata.get("combine", "mean"),
                    frame_views=preprocess.frame_views,
                    textures=[TextureMember(l2=t.get("l2", 0.0), intensity=t["view"]["intensity"]) for t in textures])
