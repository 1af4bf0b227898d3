"""Ensembles: several trained models (fold models, seeds) used as one, with optional flip TTA.

    save_ensemble(path, member_checkpoints, threshold, tta=False)   -> one .npz checkpoint
    Ensemble(models, normalizations, tta)                          -> an mc.Module

An ensemble checkpoint holds each member's weights (``member<i>.model.<name>``)
and metadata; ``covidct.checkpoint.load_checkpoint`` rebuilds it as an Ensemble
that ``evaluate`` and ``predict`` use like a single model.

The prediction is the mean of the members' probabilities (and, with TTA, of each
member on the slice and on its left-right mirror image):

    p(x) = 1/(M T) sum_m sum_t softmax(f_m(t(x)))

The Ensemble returns log p as its "logits", so softmax(log p) = p and every caller
that applies a softmax gets the averaged probabilities back unchanged. Each member
normalises the [0, 1] input with its own training statistics, so the checkpoint's
own normalisation is the identity (mean 0, std 1).

Grad-CAM (covidct.gradcam) averages the members' heatmaps; ONNX export (covidct.export)
writes the same mean of softmaxes as one graph.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import minicnn as mc

from .errors import CovidCTError

__all__ = ["Ensemble", "save_ensemble", "build_ensemble"]

KIND = "ensemble"


class Ensemble(mc.Module):
    """Mean probability of several models (inference only). Members are the attributes
    member0, member1, ..., so state_dict names are ``member<i>.<name>``."""

    def __init__(self, models, normalizations, tta: bool = False):
        if not models:
            raise CovidCTError("an ensemble needs at least one model")
        for i, model in enumerate(models):
            setattr(self, f"member{i}", model)
        self.normalizations = [(float(m), float(s)) for m, s in normalizations]
        self.tta = tta

    @property
    def members(self):
        return self.children()

    def member_input(self, x, index: int):
        """x (in [0, 1], identity-normalised) on member ``index``'s own normalisation."""
        mean, std = self.normalizations[index]
        return (x - np.float32(mean)) / np.float32(std)

    def forward(self, x):
        """x: (N, C, H, W) in [0, 1] (identity-normalised) -> log of the mean probability (N, classes)."""
        xp = mc.get_array_module(x)
        views = [x, xp.ascontiguousarray(x[..., ::-1])] if self.tta else [x]
        total = 0.0
        for index, model in enumerate(self.members):
            for view in views:
                logits = model(self.member_input(view, index))
                shifted = logits - logits.max(axis=1, keepdims=True)
                probs = xp.exp(shifted)
                total = total + probs / probs.sum(axis=1, keepdims=True)
        mean_probs = total / (len(self.normalizations) * len(views))
        return xp.log(xp.maximum(mean_probs, np.float32(1e-30))).astype(np.float32)

    def backward(self, grad):
        raise CovidCTError("an ensemble is for inference only (evaluate, predict, Grad-CAM); "
                           "training takes one of its member checkpoints")


def save_ensemble(path, member_checkpoints, threshold: float, tta: bool = False, info: dict | None = None) -> Path:
    """Join member checkpoints (same preprocessing) into one ensemble checkpoint, written atomically."""
    from .checkpoint import load_checkpoint, save_checkpoint

    models, metas, preprocess = [], [], None
    for member in member_checkpoints:
        model, meta = load_checkpoint(member)
        if meta.get("kind") == KIND:
            raise CovidCTError(f"{member}: is an ensemble itself; give the member checkpoints")
        preprocess = preprocess or meta["preprocess"]
        if meta["preprocess"] != preprocess:
            raise CovidCTError(f"{member}: preprocessing {meta['preprocess']} differs from the first member's "
                               f"{preprocess}; an ensemble needs one preprocessing")
        models.append(model)
        metas.append({k: meta[k] for k in ("model_config", "normalization", "epoch")})
    ensemble = Ensemble(models, [(m["normalization"]["mean"], m["normalization"]["std"]) for m in metas], tta)
    metadata = {"kind": KIND, "members": metas, "tta": bool(tta), "threshold": float(threshold),
                "preprocess": preprocess,
                "normalization": {"mean": 0.0, "std": 1.0}, "model_config": metas[0]["model_config"],
                "metrics": info or {}}
    return save_checkpoint(path, ensemble, metadata)


def build_ensemble(metadata: dict) -> Ensemble:
    """An Ensemble with fresh members shaped as the checkpoint's metadata says (weights loaded after)."""
    from .model import build_model, config_from_dict

    members = metadata["members"]
    return Ensemble([build_model(config_from_dict(m["model_config"])) for m in members],
                    [(m["normalization"]["mean"], m["normalization"]["std"]) for m in members],
                    tta=bool(metadata.get("tta", False)))
