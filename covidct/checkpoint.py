"""covidct checkpoints: one ``.npz`` that rebuilds the exact model with no extra flags.

Arrays: ``model.<name>`` (weights), and in resumable checkpoints ``optimizer.<name>``.
Metadata (JSON inside the archive): model config, preprocessing and
normalisation statistics, decision threshold, class names, training config,
metrics, epoch, RNG states and software versions.
"""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

import minicnn as mc
from minicnn import serialization

from . import CLASS_NAMES, __version__
from .errors import CovidCTError
from .model import build_model, config_from_dict

FORMAT = "covidct-checkpoint-1"


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
    """-> (model arrays, optimizer arrays, metadata), with one-line errors for bad files."""
    path = Path(path)
    try:
        arrays, metadata = serialization.load(path)
    except FileNotFoundError:
        raise CovidCTError(f"{path}: checkpoint not found") from None
    except ValueError as error:
        raise CovidCTError(str(error)) from None
    if metadata.get("format") != FORMAT:
        raise CovidCTError(f"{path}: not a covidct checkpoint (no '{FORMAT}' metadata); "
                           "train one with 'covidct train'")
    model_arrays = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    optimizer_arrays = {k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")}
    return model_arrays, optimizer_arrays, metadata


def load_checkpoint(path, device: str = "cpu") -> tuple[mc.Module, dict]:
    """Rebuild the model stored in ``path`` (in eval mode) -> (model, metadata)."""
    model_arrays, _, metadata = read_checkpoint(path)
    if metadata.get("kind") == "ensemble":                 # covidct.ensemble: several models as one
        from .ensemble import build_ensemble
        model = build_ensemble(metadata)
    else:
        model = build_model(config_from_dict(metadata["model_config"]))
    try:
        model.load_state_dict(model_arrays)
    except (KeyError, ValueError) as error:
        raise CovidCTError(f"{path}: weights do not fit the stored model config ({error})") from None
    return model.to(device).eval(), metadata
