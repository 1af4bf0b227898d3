"""Gradient checking: compare a module's backward with central finite differences.

Everything runs on a float64 copy on the CPU. The scalar that is differentiated
is a random projection of the output, f(x) = sum(forward(x) * upstream), so
every output element matters (an all-ones projection would hide some bugs).

    numerical  df/dx[i] ~ (f(x + h e_i) - f(x - h e_i)) / (2h)      error O(h^2)
    analytic   module.backward(upstream)

The relative error of a tensor is max_i |a_i - n_i| / max(max|a|, max|n|):
the worst absolute difference measured against the gradient's own scale.
"""
from __future__ import annotations

import copy

import numpy as np

from .backend import as_numpy


def numerical_gradient(f, array: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to ``array`` (perturbed in place, restored)."""
    grad = np.zeros_like(array)
    flat, flat_grad = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + eps
        f_plus = f()
        flat[i] = original - eps
        f_minus = f()
        flat[i] = original
        flat_grad[i] = (f_plus - f_minus) / (2 * eps)
    return grad


def relative_error(analytic, numerical) -> float:
    scale = max(np.abs(analytic).max(initial=0.0), np.abs(numerical).max(initial=0.0), 1e-300)
    return float(np.abs(analytic - numerical).max(initial=0.0) / scale)


def compare(name: str, analytic, numerical, rtol: float) -> float:
    """Raise an AssertionError naming the tensor, worst index and both values if they disagree."""
    analytic = np.asarray(analytic, dtype=np.float64)
    if analytic.shape != numerical.shape:
        raise AssertionError(f"gradient of {name}: shape {analytic.shape}, expected {numerical.shape}")
    error = relative_error(analytic, numerical)
    if not error <= rtol:  # also catches NaN
        worst = np.unravel_index(np.abs(analytic - numerical).argmax(), numerical.shape)
        raise AssertionError(
            f"gradient of {name} is wrong: relative error {error:.3e} > {rtol:.0e}; worst at index "
            f"{tuple(int(i) for i in worst)}: analytic {analytic[worst]:.10g}, numerical {numerical[worst]:.10g}")
    return error


def check_module(module, x, *args, eps: float = 1e-6, rtol: float = 1e-6, seed: int = 0,
                 check_input: bool = True) -> dict[str, float]:
    """Check dx and every parameter gradient of ``module`` at input ``x``.

    ``args`` are extra forward arguments (e.g. the labels of a loss). Returns
    {tensor name: relative error}; raises AssertionError on the first failure.
    The module itself is not changed: the check runs on a float64 CPU copy,
    and every evaluation starts from a fresh copy, so random state (dropout
    masks) is the same in each one.
    """
    base = copy.deepcopy(module).map_arrays(lambda a: as_numpy(a).astype(np.float64))
    x = as_numpy(x).astype(np.float64)
    args = [as_numpy(a) for a in args]

    def forward():
        return copy.deepcopy(base).forward(x, *args)

    upstream = np.random.default_rng(seed).standard_normal(np.shape(forward()))

    def f():
        return float(np.sum(forward() * upstream))

    analytic_module = copy.deepcopy(base)
    analytic_module.forward(x, *args)
    grad_x = analytic_module.backward(upstream)
    errors = {}
    if check_input:
        errors["input"] = compare(f"{type(module).__name__} input", grad_x, numerical_gradient(f, x, eps), rtol)
    analytic_params = dict(analytic_module.named_parameters())
    for name, param in base.named_parameters():
        analytic = analytic_params[name].grad
        if analytic is None:
            raise AssertionError(f"gradient of {type(module).__name__}.{name}: backward left .grad as None")
        errors[name] = compare(f"{type(module).__name__}.{name}", analytic,
                               numerical_gradient(f, param.data, eps), rtol)
    return errors


def check_function(forward, backward, inputs: dict[str, np.ndarray], *, eps: float = 1e-6,
                   rtol: float = 1e-6, seed: int = 0) -> dict[str, float]:
    """Function form: ``forward(**inputs) -> out``, ``backward(upstream, **inputs) -> {name: grad}``."""
    inputs = {name: as_numpy(value).astype(np.float64) for name, value in inputs.items()}
    upstream = np.random.default_rng(seed).standard_normal(np.shape(forward(**inputs)))

    def f():
        return float(np.sum(forward(**inputs) * upstream))

    analytic = backward(upstream, **inputs)
    return {name: compare(name, analytic[name], numerical_gradient(f, inputs[name], eps), rtol)
            for name in inputs}
