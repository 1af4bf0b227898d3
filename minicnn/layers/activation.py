"""Activations."""
from __future__ import annotations

from .. import cuda_kernels, fast
from ..backend import get_array_module
from ..grad_mode import is_grad_enabled
from ..module import Module


class ReLU(Module):
    """out = max(x, 0), elementwise. Shapes: any -> same.

    ``inplace=True`` (as torch.nn.ReLU(inplace=True)) writes the result into x itself
    and returns x: no new array. Use it only where nothing else needs x afterwards,
    e.g. right after a BatchNorm or a residual add whose output only the ReLU sees.
    """

    def __init__(self, inplace: bool = False):
        self.inplace = inplace

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""

    def forward(self, x):
        if fast.use_fast_path(x):                   # the same, split over the batch in threads
            out, positive = fast.relu_forward(x, inplace=self.inplace, keep_mask=is_grad_enabled())
            self.save_for_backward(positive)
            return out
        if cuda_kernels.enabled(x) and x.flags.c_contiguous:   # CuPy: output and mask in one launch
            out, positive = cuda_kernels.relu_forward(x, inplace=self.inplace, keep_mask=is_grad_enabled())
            self.save_for_backward(positive)
            return out
        xp = get_array_module(x)
        out = xp.maximum(x, 0, out=x) if self.inplace else xp.maximum(x, 0)
        if is_grad_enabled():                       # under no_grad the mask is not even computed
            self.save_for_backward(out > 0)
        return out

    def fused_into_maxpool(self) -> None:
        """Sequential ran this ReLU as part of the next MaxPool2d: backward passes gradients through."""
        self.save_for_backward(None)

    # Backward: d max(x, 0)/dx is 1 where x > 0 and 0 elsewhere (we take 0 at x = 0,
    # like PyTorch). The caller's grad_output is never modified.
    # grad * mask rather than xp.where(mask, grad, 0): the same numbers for any finite
    # gradient, and on NumPy about 5x faster (where's per-element branch on a random
    # mask is slow). Only a NaN or infinite gradient at x <= 0 differs (NaN instead of 0).
    def backward(self, grad_output):
        (positive,) = self.saved_for_backward()
        if positive is None:                        # fused: the max-pool's backward applied the mask
            return grad_output
        if fast.use_fast_path(grad_output, positive):
            return fast.multiply(grad_output, positive)
        return grad_output * positive
