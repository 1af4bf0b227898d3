"""Weight initialisers, computed on the host with an explicit random Generator.

Same seed, same weights, on every backend: layers draw their initial weights
here with NumPy and only then move them to a device.

``manual_seed(s)`` reseeds the generator used when a layer gets ``rng=None``
(like ``torch.manual_seed``). The default initialisation of Conv2d and Linear
matches PyTorch's in distribution: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
which is PyTorch's kaiming_uniform(a=sqrt(5)).
"""
from __future__ import annotations

import math

import numpy as np

_default_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reseed the generator that layers use when they are given no ``rng``."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)


def default_rng() -> np.random.Generator:
    return _default_rng


def fan_in_and_fan_out(shape) -> tuple[int, int]:
    """Linear (out, in) -> (in, out); Conv2d (out, in, kh, kw) -> (in*kh*kw, out*kh*kw)."""
    if len(shape) < 2:
        raise ValueError(f"fan in/out needs a weight of at least 2 dimensions, got shape {tuple(shape)}")
    receptive_field = math.prod(shape[2:])
    return shape[1] * receptive_field, shape[0] * receptive_field


def calculate_gain(nonlinearity: str = "leaky_relu", a: float = 0.0) -> float:
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1 + a * a))
    if nonlinearity in ("linear", "sigmoid", "conv2d"):
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    raise ValueError(f"unknown nonlinearity {nonlinearity!r}")


def uniform(shape, bound: float, rng=None, dtype=np.float32) -> np.ndarray:
    """U(-bound, bound)."""
    rng = rng or _default_rng
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def normal(shape, std: float, rng=None, dtype=np.float32) -> np.ndarray:
    """N(0, std^2)."""
    rng = rng or _default_rng
    return (rng.standard_normal(size=shape) * std).astype(dtype)


def kaiming_uniform(shape, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                    rng=None, dtype=np.float32) -> np.ndarray:
    """He uniform: U(-b, b), b = gain * sqrt(3 / fan). a=sqrt(5) gives PyTorch's layer default."""
    fan = fan_in_and_fan_out(shape)[0 if mode == "fan_in" else 1]
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / fan)
    return uniform(shape, bound, rng, dtype)


def kaiming_normal(shape, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "relu",
                   rng=None, dtype=np.float32) -> np.ndarray:
    """He normal: N(0, std^2), std = gain / sqrt(fan)."""
    fan = fan_in_and_fan_out(shape)[0 if mode == "fan_in" else 1]
    return normal(shape, calculate_gain(nonlinearity, a) / math.sqrt(fan), rng, dtype)


def xavier_uniform(shape, gain: float = 1.0, rng=None, dtype=np.float32) -> np.ndarray:
    """Glorot uniform: U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fan_in_and_fan_out(shape)
    return uniform(shape, gain * math.sqrt(6.0 / (fan_in + fan_out)), rng, dtype)


def xavier_normal(shape, gain: float = 1.0, rng=None, dtype=np.float32) -> np.ndarray:
    """Glorot normal: N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = fan_in_and_fan_out(shape)
    return normal(shape, gain * math.sqrt(2.0 / (fan_in + fan_out)), rng, dtype)


def default_weight_and_bias(weight_shape, bias: bool, rng=None, dtype=np.float32):
    """PyTorch's Conv2d/Linear default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    rng = rng or _default_rng
    weight = kaiming_uniform(weight_shape, a=math.sqrt(5), rng=rng, dtype=dtype)
    fan_in = fan_in_and_fan_out(weight_shape)[0]
    bias_array = uniform((weight_shape[0],), 1.0 / math.sqrt(fan_in), rng, dtype) if bias else None
    return weight, bias_array
