"""2-D convolution (really cross-correlation, as in every DL framework)."""
from __future__ import annotations

import numpy as np

from .. import fast
from ..backend import check_same_device, get_array_module
from ..im2col import col2im, im2col, output_size, pair
from ..init import default_weight_and_bias
from ..module import Module, Parameter


# Weight matrices (F x C*kh*kw) with at least this many values get their gradient as
# G @ col.T directly (see Conv2d.backward): 2**18 values = 1 MiB of float32.
LARGE_WEIGHT = 2 ** 18


class Conv2d(Module):
    """out[n, f, i, j] = b[f] + sum_{c, ky, kx} w[f, c, ky, kx] * x_pad[n, c, i*sy + ky, j*sx + kx]

    Shapes: x (N, C, H, W) -> out (N, F, OH, OW), OH = (H + 2*py - kh) // sy + 1.
    weight (F, C, kh, kw), bias (F,), the same as torch.nn.Conv2d.

    Computed as one matrix product:  out(F, N*OH*OW) = W(F, C*kh*kw) @ col(C*kh*kw, N*OH*OW),
    where col = im2col(x) holds each output pixel's receptive field in a column.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, *, rng=None, dtype=np.float32):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"Conv2d: kernel_size and stride must be >= 1 and padding >= 0, got "
                             f"{self.kernel_size}, {self.stride}, {self.padding}")
        weight, bias_init = default_weight_and_bias(
            (out_channels, in_channels, *self.kernel_size), bias, rng=rng, dtype=dtype)
        self.weight = Parameter(weight)
        self.bias = Parameter(bias_init) if bias else None
        # False for a network's first layer: its input (the image) needs no gradient.
        self.needs_input_grad = True

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}")

    def forward(self, x):
        check_input(self, x, self.in_channels, self.weight.data)
        n, _, h, w = x.shape
        out_h, out_w = output_size("Conv2d", (h, w), self.kernel_size, self.stride, self.padding)
        f = self.out_channels
        if fast.use_fast_path(x, self.weight.data):
            # The same computation batch chunk by batch chunk, in threads (minicnn/fast.py);
            # it keeps x instead of col, and backward redoes im2col chunk by chunk.
            self.save_for_backward(None, x.shape, x)
            return fast.conv2d_forward(self, x, (out_h, out_w))

        col = im2col(x, self.kernel_size, self.stride, self.padding, (out_h, out_w))  # (C, kh, kw, N, OH, OW)
        col_matrix = col.reshape(-1, n * out_h * out_w)                              # (K, N*OH*OW), K = C*kh*kw
        out = self.weight.data.reshape(f, -1) @ col_matrix                           # (F, N*OH*OW)
        if self.bias is not None:
            out += self.bias.data[:, None]
        self.save_for_backward(col_matrix, x.shape, None)
        return out.reshape(f, n, out_h, out_w).transpose(1, 0, 2, 3)                # (N, F, OH, OW)

    # Backward. With G = grad_out as (F, N*OH*OW) and out = W @ col + b:
    #   dL/dW   = G @ col.T                      (F, K)
    #   dL/db   = G summed over its columns      (F,)
    #   dL/dcol = W.T @ G                        (K, N*OH*OW)
    #   dL/dx   = col2im(dL/dcol): each column entry goes back to the pixel it was
    #             copied from, and overlapping windows add up.
    def backward(self, grad_output):
        col_matrix, x_shape, x = self.saved_for_backward()
        if col_matrix is None:                                                       # the fast path's forward
            return fast.conv2d_backward(self, x, grad_output)
        xp = get_array_module(grad_output)
        f = self.out_channels
        grad_matrix = grad_output.transpose(1, 0, 2, 3).reshape(f, -1)               # (F, N*OH*OW)

        if f * col_matrix.shape[0] >= LARGE_WEIGHT:
            # Large weights (ResNet's 256- and 512-channel convs): BLAS is as fast either
            # way round, and G @ col.T comes out C-contiguous. The transposed form below
            # would leave a strided gradient that makes the optimizer's elementwise update
            # of it ~10x slower (12 ms instead of 1 for each 512x512x3x3 weight).
            grad_weight = grad_matrix @ col_matrix.T                                # (F, K)
        else:
            # G @ col.T computed as (col @ G.T).T: the same numbers, but BLAS is far faster
            # this way round when F is small (a tall-skinny product with a long inner axis).
            grad_weight = (col_matrix @ grad_matrix.T).T
        self.weight.accumulate_grad(grad_weight.reshape(self.weight.data.shape))
        if self.bias is not None:
            self.bias.accumulate_grad(grad_matrix.sum(axis=1))
        if not self.needs_input_grad:
            return None
        # col is dead once the weight gradient has it: write dL/dcol (the same shape) into
        # its buffer instead of a new one. Saves one col-sized allocation (the largest
        # arrays of a conv net) and the page faults of touching fresh memory.
        grad_col = xp.matmul(self.weight.data.reshape(f, -1).T, grad_matrix, out=col_matrix)   # (K, N*OH*OW)
        c, (kh, kw) = self.in_channels, self.kernel_size
        grad_col = grad_col.reshape(c, kh, kw, x_shape[0], *grad_output.shape[2:])
        return col2im(grad_col, x_shape, self.stride, self.padding)


def check_input(layer: Module, x, channels: int, weight) -> None:
    """Clear errors for the usual mistakes: wrong rank, channel count, device or dtype."""
    name = type(layer).__name__
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name}: expected input of shape (N, {channels}, H, W), got shape {getattr(x, 'shape', type(x))}")
    if x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} input channels, got input of shape {tuple(x.shape)}")
    check_same_device(name, x, weight)
    if x.dtype != weight.dtype:
        raise TypeError(f"{name}: input dtype {x.dtype} does not match weight dtype {weight.dtype}; "
                        f"convert the input with x.astype('{weight.dtype}')")
