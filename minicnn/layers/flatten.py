"""Flatten."""
from __future__ import annotations

from ..module import Module


class Flatten(Module):
    """(N, C, H, W) -> (N, C*H*W). Backward reshapes the gradient back."""

    def forward(self, x):
        self.save_for_backward(x.shape)
        return x.reshape(x.shape[0], -1)

    # Backward: flattening only renumbers the elements, so the gradient of each
    # input element is the gradient of the output element it became.
    def backward(self, grad_output):
        (x_shape,) = self.saved_for_backward()
        return grad_output.reshape(x_shape)
