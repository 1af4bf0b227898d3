"""Saving and loading arrays: ``.npz`` files, written atomically, read without pickle.

A checkpoint is a flat ``{name: array}`` dict (a state_dict) plus JSON metadata
stored inside the same archive under ``__metadata__``. Loading never unpickles:
``np.load(..., allow_pickle=False)``.
"""
from __future__ import annotations

import json
import os
import tempfile
import tokenize
import zipfile
from pathlib import Path

import numpy as np

from .backend import as_numpy

METADATA_KEY = "__metadata__"


def save(path, state_dict: dict, metadata: dict | None = None) -> Path:
    """Write ``state_dict`` (+ JSON-able ``metadata``) to ``path`` atomically.

    The archive is written to a temporary file in the same folder, flushed to
    disk and renamed over ``path``, so a crash never leaves a half-written file.
    """
    path = Path(path)
    if METADATA_KEY in state_dict:
        raise ValueError(f"save: '{METADATA_KEY}' is a reserved name")
    arrays = {name: as_numpy(array) for name, array in state_dict.items()}
    for name, array in arrays.items():
        if array.dtype == object:
            raise TypeError(f"save: '{name}' is an object array; only numeric arrays can be saved without pickle")
    arrays[METADATA_KEY] = np.array(json.dumps(metadata or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def load(path) -> tuple[dict, dict]:
    """Read a file written by ``save`` -> (state_dict of NumPy arrays, metadata dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__   # a damaged .npy header
        raise ValueError(f"{path}: not a readable .npz checkpoint ({reason})") from None
    metadata = {}
    if METADATA_KEY in arrays:
        try:
            metadata = json.loads(str(arrays.pop(METADATA_KEY)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: checkpoint metadata is not valid JSON ({error})") from None
    return arrays, metadata
from .torch_load import load_state_dict_file, load_torch_state_dict  # noqa: E402,F401  (torch.save files, read without torch)
