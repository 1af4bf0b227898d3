"""covidct checkpoints: one ``.npz`` that rebuilds the exact model with no extra flags.

Arrays: ``model.<name>`` (weights), and in resumable checkpoints ``optimizer.<name>``.
Metadata (JSON inside the archive): the task the weights are for, model config,
preprocessing and normalisation statistics, decision threshold, class names,
training config, metrics, epoch, RNG states and software versions.

Tasks: ``covid`` (covidct train: P(COVID), what predict and evaluate need) and
``rotation`` (covidct pretrain: a 4-way rotation pretext head, only a starting
point for ``covidct train --pretrained``). Loading for the wrong task, a file
whose metadata is missing or hand-edited, or weights with NaN/inf is refused
with one line.
"""
from __future__ import annotations

import math
import platform
from pathlib import Path

import numpy as np

import minicnn as mc
from minicnn import serialization

from . import CLASS_NAMES, __version__
from .errors import CovidCTError
from .model import build_model, config_from_dict

FORMAT = "covidct-checkpoint-1"
TASK_COVID, TASK_ROTATION, TASK_CONTRASTIVE = "covid", "rotation", "contrastive"
TASK_NAMES = {TASK_COVID: "COVID classifier (covidct train)",
              TASK_ROTATION: "rotation-pretraining (covidct pretrain)",
              TASK_CONTRASTIVE: "contrastive-pretraining (examples/contrastive_pretrain.py)"}


def software_versions() -> dict:
    return {"covidct": __version__, "minicnn": mc.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def save_checkpoint(path, model: mc.Module, metadata: dict, optimizer=None) -> Path:
    """Write weights (+ optimizer state) and metadata atomically."""
    arrays = {f"model.{name}": array for name, array in model.state_dict().items()}
    if optimizer is not None:
        arrays.update({f"optimizer.{name}": array for name, array in optimizer.state_dict().items()})
    metadata = dict(metadata, format=FORMAT, class_names=list(CLASS_NAMES), versions=software_versions())
    return serialization.save(path, arrays, metadata)


def read_checkpoint(path) -> tuple[dict, dict, dict]:
    """-> (model arrays, optimizer arrays, metadata), with one-line errors for bad files.

    Refuses a missing file or a folder, an unreadable archive, missing covidct
    metadata and model weights with NaN/inf (naming the tensor).
    """
    path = Path(path)
    if path.is_dir():
        raise CovidCTError(f"{path}: is a directory; give a checkpoint file such as {path / 'best.npz'}")
    try:
        arrays, metadata = serialization.load(path)
    except FileNotFoundError:
        raise CovidCTError(f"{path}: checkpoint not found") from None
    except ValueError as error:
        raise CovidCTError(f"not a covidct checkpoint: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CovidCTError(f"not a covidct checkpoint: {path}: no '{FORMAT}' metadata; "
                           "train one with 'covidct train'")
    model_arrays = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    optimizer_arrays = {k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")}
    check_finite(model_arrays, path)
    return model_arrays, optimizer_arrays, metadata


def check_finite(arrays: dict, where) -> None:
    """CovidCTError naming the first tensor with NaN/inf values (a damaged file or a diverged run)."""
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise CovidCTError(f"{where}: tensor '{name}' has {bad} NaN/inf values; the file is damaged "
                               "or comes from a diverged run")


def checkpoint_task(metadata: dict) -> str:
    """The task a checkpoint's weights are for (files written before the field: from their other keys)."""
    return metadata.get("task") or (TASK_ROTATION if metadata.get("pretext") == "rotation" else TASK_COVID)


def check_metadata(path, metadata: dict) -> None:
    """CovidCTError "not a covidct checkpoint: ..." unless every field predict/evaluate read is usable."""
    from .preprocess import Preprocess

    def refuse(reason):
        raise CovidCTError(f"not a covidct checkpoint: {path}: {reason}")

    for key in ("model_config", "preprocess", "normalization"):
        if not isinstance(metadata.get(key), dict):
            refuse(f"metadata has no '{key}' object")
    try:
        config_from_dict(metadata["model_config"]).feature_shape()
        Preprocess.from_dict(metadata["preprocess"])
    except (CovidCTError, TypeError, ValueError, KeyError, AttributeError) as error:
        refuse(f"bad model_config or preprocess metadata ({error})")
    normalization = metadata["normalization"]
    try:
        mean, std = float(normalization["mean"]), float(normalization["std"])
    except (KeyError, TypeError, ValueError):
        refuse(f"normalization must hold numbers 'mean' and 'std', got {normalization}")
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        refuse(f"normalization mean {mean}, std {std}: expected finite numbers and std > 0")
    threshold = metadata.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        refuse(f"threshold {threshold!r}: expected a number in [0, 1]")


def load_checkpoint(path, device: str = "cpu", task: str | None = TASK_COVID) -> tuple[mc.Module, dict]:
    """Rebuild the model stored in ``path`` (in eval mode) -> (model, metadata).

    task: the task the caller needs (default: a COVID classifier); None accepts any.
    """
    model_arrays, _, metadata = read_checkpoint(path)
    check_metadata(path, metadata)
    found = checkpoint_task(metadata)
    if task is not None and found != task:
        pretraining = found != TASK_COVID                   # rotation or contrastive: a starting point
        hint = f"; use it as a starting point: covidct train --pretrained {path}" if pretraining else ""
        raise CovidCTError(f"{path}: a {TASK_NAMES.get(found, found)} checkpoint, but this needs a "
                           f"{TASK_NAMES.get(task, task)} one{hint}")
    config = config_from_dict(metadata["model_config"])
    if task == TASK_COVID and config.num_classes != len(CLASS_NAMES):
        raise CovidCTError(f"{path}: the model has {config.num_classes} outputs; a COVID classifier has "
                           f"{len(CLASS_NAMES)}")
    if metadata.get("kind") == "ensemble":                 # covidct.ensemble: several models as one
        from .ensemble import build_ensemble
        try:
            model = build_ensemble(metadata)
        except CovidCTError as error:
            raise CovidCTError(f"{path}: {error}") from None
    else:
        model = build_model(config)
    try:
        model.load_state_dict(model_arrays)
    except (KeyError, ValueError) as error:
        raise CovidCTError(f"{path}: weights do not fit the stored model config ({error})") from None
    return model.to(device).eval(), metadata
