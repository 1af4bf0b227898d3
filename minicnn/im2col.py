"""im2col / col2im: turn a convolution into one matrix multiplication.

For every kernel offset (ky, kx) the input pixels that meet weight
w[:, :, ky, kx] form a strided slice of the padded image. im2col copies those
kh*kw slices into one buffer; col2im adds gradients back through the same
slices. Only the kernel window is looped over (as in Chainer), never pixels or
batch items, so the same code runs on NumPy and CuPy and needs no fancy-index
scatter (NumPy's ``add.at``): overlapping windows simply accumulate with ``+=``.

Buffer layout: col[c, ky, kx, n, oy, ox] = x_padded[n, c, oy*sy + ky, ox*sx + kx]
so that ``col.reshape(C*kh*kw, N*OH*OW)`` is the right-hand side of the
convolution GEMM  out(F, N*OH*OW) = W(F, C*kh*kw) @ col.
"""
from __future__ import annotations

from . import cuda_kernels
from .backend import get_array_module


def pair(value, name: str = "value") -> tuple[int, int]:
    """3 -> (3, 3); (3, 5) -> (3, 5). Used for kernel_size, stride, padding."""
    if isinstance(value, int):
        value = (value, value)
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return tuple(value)


def output_size(layer: str, in_hw, kernel, stride, padding) -> tuple[int, int]:
    """Output (OH, OW), rounding down like PyTorch: (H + 2p - k) // s + 1."""
    (h, w), (kh, kw), (sy, sx), (py, px) = in_hw, kernel, stride, padding
    if kh > h + 2 * py or kw > w + 2 * px:
        raise ValueError(f"{layer}: kernel {kh}x{kw} larger than padded input {h + 2 * py}x{w + 2 * px}")
    return (h + 2 * py - kh) // sy + 1, (w + 2 * px - kw) // sx + 1


def pad2d(x, padding, value=0.0):
    """Pad the last two axes of x (N, C, H, W) -> (N, C, H + 2py, W + 2px)."""
    py, px = padding
    if py == 0 and px == 0:
        return x
    xp = get_array_module(x)
    n, c, h, w = x.shape
    padded = xp.full((n, c, h + 2 * py, w + 2 * px), value, dtype=x.dtype)
    padded[:, :, py:py + h, px:px + w] = x
    return padded


def im2col(x, kernel, stride, padding, out_hw):
    """x: (N, C, H, W) -> col: (C, kh, kw, N, OH, OW), same dtype and device as x."""
    if cuda_kernels.enabled(x):                     # CuPy: the same in one kernel launch
        return cuda_kernels.im2col(x, kernel, stride, padding, out_hw)
    xp = get_array_module(x)
    (kh, kw), (sy, sx), (oh, ow) = kernel, stride, out_hw
    x_padded = pad2d(x, padding)
    n, c = x.shape[:2]
    col = xp.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    for ky in range(kh):
        for kx in range(kw):
            window = x_padded[:, :, ky:ky + sy * oh:sy, kx:kx + sx * ow:sx]  # (N, C, OH, OW)
            col[:, ky, kx] = window.transpose(1, 0, 2, 3)
    return col


def col2im(col, in_shape, stride, padding):
    """col: (C, kh, kw, N, OH, OW) -> x: (N, C, H, W), adding overlapping windows.

    The adjoint of im2col: every col entry is added back onto the input pixel
    it was copied from. Padding rows/columns are cut off at the end.
    """
    if cuda_kernels.enabled(col):                   # CuPy: the same in one kernel launch
        return cuda_kernels.col2im(col, in_shape, stride, padding)
    xp = get_array_module(col)
    c, kh, kw, n, oh, ow = col.shape
    (sy, sx), (py, px) = stride, padding
    _, _, h, w = in_shape
    x_padded = xp.zeros((n, c, h + 2 * py, w + 2 * px), dtype=col.dtype)
    for ky in range(kh):
        for kx in range(kw):
            x_padded[:, :, ky:ky + sy * oh:sy, kx:kx + sx * ow:sx] += col[:, ky, kx].transpose(1, 0, 2, 3)
    return x_padded[:, :, py:py + h, px:px + w]
