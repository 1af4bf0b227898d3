"""Array backend: NumPy on the CPU, CuPy on the GPU.

The device follows the data. A layer never decides where it runs; it asks the
array it was given:

    xp = get_array_module(x)      # numpy or cupy
    out = xp.maximum(x, 0)

CuPy is optional. Without it (or without a working CUDA device) everything runs
on NumPy and ``gpu_available()`` says why the GPU is unusable.
"""
from __future__ import annotations

import numpy as np

try:  # CuPy is the optional `gpu` extra.
    import cupy as _cupy
except Exception:  # ImportError, or a broken CUDA install raising at import
    _cupy = None

DEVICES = ("cpu", "gpu")
_gpu_status: tuple[bool, str] | None = None


def gpu_status() -> tuple[bool, str]:
    """(usable, reason). Tries a tiny computation once and caches the answer."""
    global _gpu_status
    if _gpu_status is None:
        if _cupy is None:
            _gpu_status = (False, "CuPy is not installed (pip install -e '.[gpu]')")
        else:
            try:
                (_cupy.arange(4, dtype=_cupy.float32) * 2).sum().item()
                _gpu_status = (True, "CuPy " + _cupy.__version__)
            except Exception as error:  # CUDA driver/runtime errors have many types
                _gpu_status = (False, f"CuPy cannot use a GPU: {type(error).__name__}: {error}")
    return _gpu_status


def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA device actually runs a kernel."""
    return gpu_status()[0]


def is_gpu_array(x) -> bool:
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def get_array_module(*arrays):
    """The array namespace (``numpy`` or ``cupy``) that the given arrays live in.

    Non-array arguments (None, Python scalars) are ignored. An array type that
    is neither NumPy's nor CuPy's may name its namespace through the Array API's
    ``__array_namespace__()``; the tests use that for a stand-in device.
    """
    for x in arrays:
        if is_gpu_array(x):
            return _cupy
    for x in arrays:
        if isinstance(x, np.ndarray) and type(x) is not np.ndarray and hasattr(x, "__array_namespace__"):
            return x.__array_namespace__()
    return np


def device_of(x) -> str:
    """'gpu' for a CuPy array, 'cpu' for anything else."""
    return "gpu" if is_gpu_array(x) else "cpu"


def as_numpy(x) -> np.ndarray:
    """A host NumPy array (copies from the GPU when needed)."""
    if is_gpu_array(x):
        return _cupy.asnumpy(x)
    if isinstance(x, np.ndarray) and type(x) is not np.ndarray:
        return x.view(np.ndarray)
    return np.asarray(x)


def to_device(x, device: str):
    """Move an array to 'cpu' (NumPy) or 'gpu' (CuPy). No copy if it is already there."""
    if device == "cpu":
        return as_numpy(x)
    if device == "gpu":
        usable, reason = gpu_status()
        if not usable:
            raise RuntimeError(f"device 'gpu' requested but {reason}")
        return _cupy.asarray(x)
    raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")


def synchronize() -> None:
    """Wait for queued GPU work to finish (a no-op on the CPU). Call before timing."""
    if _cupy is not None and gpu_available():
        _cupy.cuda.get_current_stream().synchronize()


def check_same_device(layer: str, x, *arrays) -> None:
    """Raise a TypeError that says what to call when x and the weights live apart."""
    x_module = get_array_module(x)
    for array in arrays:
        if array is not None and get_array_module(array) is not x_module:
            raise TypeError(
                f"{layer}: input is on {_where(x)} but the layer's parameters are on "
                f"{_where(array)}; call model.to('{device_of(x)}') or move the input "
                f"with minicnn.to_device(x, '{device_of(array)}')")


def _where(x) -> str:
    return "the GPU (CuPy)" if is_gpu_array(x) else f"the CPU ({type(x).__module__}.{type(x).__name__})"
