"""Dropout."""
from __future__ import annotations

from .. import init
from ..backend import get_array_module
from ..module import Module


class Dropout(Module):
    """Inverted dropout. Train mode: out = x * mask / (1 - p), mask ~ Bernoulli(1 - p);
    eval mode: out = x. Shapes: any -> same.

    The mask is drawn on the host from a seeded ``numpy.random.Generator`` and
    then moved to x's device, so the same seed drops the same units on every
    backend.
    """

    def __init__(self, p: float = 0.5, *, rng=None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        self.rng = rng or init.default_rng()

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.save_for_backward(None)
            return x
        xp = get_array_module(x)
        keep = self.rng.random(x.shape, dtype="float32") >= self.p   # host, seeded
        scaled_mask = xp.asarray(keep, dtype=x.dtype) * (1.0 / (1.0 - self.p))
        self.save_for_backward(scaled_mask)
        return x * scaled_mask

    # Backward: out is x times a constant mask, so grad_x = grad_out * mask.
    def backward(self, grad_output):
        (scaled_mask,) = self.saved_for_backward()
        return grad_output if scaled_mask is None else grad_output * scaled_mask
