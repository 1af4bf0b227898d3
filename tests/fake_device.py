"""A stand-in GPU for machines without one: it fails on any host-NumPy leak.

``DeviceArray`` is a NumPy array that pretends to live on another device.
Its namespace (what ``get_array_module`` returns for it) is ``device_xp``,
which behaves like NumPy but takes and returns DeviceArrays, the way CuPy
takes and returns GPU arrays. Code that leaks to host NumPy is caught:

* ``np.sum(dev)``, ``np.where(dev, ...)``...  -> TypeError (``__array_function__``)
* mixing a host array with a device array in arithmetic (an ``np.zeros`` buffer,
  an ``np.random`` mask)                      -> TypeError (``__array_ufunc__``)
* results that silently became host arrays  -> the tests check output types.
"""
import functools
import types

import numpy as np


class HostLeakError(TypeError):
    pass


def _unwrap(value):
    if isinstance(value, DeviceArray):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _wrap(value):
    if isinstance(value, np.generic):  # CuPy reductions give 0-d device arrays, not host scalars
        value = np.asarray(value)
    if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
        return value.view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class DeviceArray(np.ndarray):
    def __array_namespace__(self, api_version=None):
        return device_xp

    def __array_function__(self, func, types, args, kwargs):
        raise HostLeakError(f"host NumPy function np.{func.__name__} called on a device array")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        arrays = list(inputs) + list(kwargs.get("out", ()))
        for value in arrays:
            if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray) and value.ndim > 0:
                raise HostLeakError(f"np.{ufunc.__name__}: host array mixed with a device array")
        out = kwargs.get("out")
        result = getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs))
        if out is not None:  # in place (a += b): hand back the caller's own array
            return out[0] if len(out) == 1 else out
        return _wrap(result)


class _Namespace(types.ModuleType):
    """numpy, but every function takes and returns DeviceArrays."""

    def __init__(self, module, name):
        super().__init__(name)
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if isinstance(value, types.ModuleType):
            return _Namespace(value, f"{self.__name__}.{name}")
        if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) or type(value).__name__ == "_ArrayFunctionDispatcher":
            @functools.wraps(value)
            def on_device(*args, **kwargs):
                return _wrap(value(*_unwrap(args), **_unwrap(kwargs)))
            return on_device
        return value  # dtypes, constants, ufuncs (they dispatch through __array_ufunc__)


device_xp = _Namespace(np, "fake_device_numpy")


def to_fake_device(array):
    """Host array -> DeviceArray (a copy, like a transfer)."""
    return np.array(array).view(DeviceArray)


def on_fake_device(value) -> bool:
    return isinstance(value, DeviceArray)
