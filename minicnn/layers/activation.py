"""Activations."""
from __future__ import annotations

from ..backend import get_array_module
from ..module import Module


class ReLU(Module):
    """out = max(x, 0), elementwise. Shapes: any -> same."""

    def forward(self, x):
        xp = get_array_module(x)
        out = xp.maximum(x, 0)
        self.save_for_backward(out > 0)
        return out

    # Backward: d max(x, 0)/dx is 1 where x > 0 and 0 elsewhere (we take 0 at x = 0,
    # like PyTorch). The caller's grad_output is never modified.
    def backward(self, grad_output):
        (positive,) = self.saved_for_backward()
        xp = get_array_module(grad_output)
        return xp.where(positive, grad_output, 0).astype(grad_output.dtype, copy=False)
