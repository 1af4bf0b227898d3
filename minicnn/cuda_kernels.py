"""Fused CuPy kernels: one GPU launch where the readable xp code makes many.

The readable im2col, col2im and max-pool loop over the kernel window in Python,
so a 3x3 conv costs 9 kernel launches (a 7x7 one 49), each a small strided copy;
the optimizers' updates are 4-8 elementwise launches per parameter. On a GPU
each launch costs microseconds whatever its size, which is why the small nets are
launch-bound. Here each of these is one ``cupy.ElementwiseKernel``, one thread
per output element, written as gathers (every output element reads what it
needs), so no atomics are needed and sums run in the readable code's order:

* im2col:   col[c, ky, kx, n, oy, ox] = x[n, c, oy*sy + ky - py, ox*sx + kx - px] (0 outside x)
* col2im:   x[n, c, h, w] = sum over the (ky, kx) whose window covers (h, w), in
            row-major (ky, kx) order, of col[c, ky, kx, n, oy, ox]
* max-pool: out = max over the window's pixels inside x, argmax = the first offset
            that reaches it (strictly greater replaces, as the readable loop);
            backward is the col2im gather with grad_out where argmax == the offset
* SGD (momentum, Nesterov, weight decay) and Adam/AdamW: one pass per parameter.
* ReLU: the output and the mask out > 0 in one pass (the readable code makes two).
* BatchNorm2d: the per-channel sum of a * b as one reduction (CuPy's einsum spends
  ~0.3 ms of Python per call), and the output (x_hat * scale + shift) and the input
  gradient (g * scale - x_hat * k - c) as one pass each, per-channel values broadcast.

They are used for CuPy arrays unless ``MINICNN_CUDA_KERNELS=0`` (``enabled()``;
set it to read or step through the readable path on the GPU). tests/test_cuda_kernels.py
compares each with the readable path (it skips without a GPU; it passed on an H200,
benchmarks/RESULTS.md). All but one give the readable code's numbers: im2col, col2im
and max-pool are copies and sums in the same order, and the elementwise kernels do the
readable code's operations in its order, compiled with ``--fmad=false`` so that the
compiler does not contract a * b + c into one fused multiply-add (one rounding
instead of two). The exception is channel_dot, whose sum runs in another order than
einsum's (relative 1e-7). CuPy is imported inside the functions, so this module
imports without it.
"""
from __future__ import annotations

import functools
import os

from .backend import is_gpu_array


def enabled(*arrays) -> bool:
    """True when every array is a CuPy array, unless MINICNN_CUDA_KERNELS=0."""
    return all(is_gpu_array(a) for a in arrays) and os.environ.get("MINICNN_CUDA_KERNELS", "1") != "0"


@functools.lru_cache(maxsize=None)
def _channel_dot_kernel():
    import cupy
    # in, out, map (each element), reduce (a, b: two partial sums), post-map (a: the total), identity
    return cupy.ReductionKernel("T left, T right", "T total", "left * right", "a + b", "total = a", "0",
                                "minicnn_channel_dot", options=("--fmad=false",))


@functools.lru_cache(maxsize=None)
def _kernel(name: str):
    import cupy
    # --fmad=false: no fused multiply-add, so every product and sum is rounded on its own, as in the
    # readable code's one-operation-per-launch kernels, and the two paths give the same bits.
    return cupy.ElementwiseKernel(*_SOURCES[name], name=f"minicnn_{name}", options=("--fmad=false",))


_SOURCES = {
    # i indexes col (C, kh, kw, N, OH, OW) in C order.
    "im2col": (
        "raw T x, int32 C, int32 H, int32 W, int32 kh, int32 kw, int32 N, int32 OH, int32 OW, "
        "int32 sy, int32 sx, int32 py, int32 px",
        "T col",
        """
        int ox = i % OW; int rest = i / OW;
        int oy = rest % OH; rest /= OH;
        int n = rest % N; rest /= N;
        int kx = rest % kw; rest /= kw;
        int ky = rest % kh; int c = rest / kh;
        int h = oy * sy + ky - py, w = ox * sx + kx - px;
        col = (h >= 0 && h < H && w >= 0 && w < W) ? x[((n * C + c) * H + h) * W + w] : (T)0;
        """),
    # i indexes x (N, C, H, W); sums the col entries copied from (h, w) in (ky, kx) order.
    "col2im": (
        "raw T col, int32 C, int32 H, int32 W, int32 kh, int32 kw, int32 N, int32 OH, int32 OW, "
        "int32 sy, int32 sx, int32 py, int32 px",
        "T x",
        """
        int w = i % W; int rest = i / W;
        int h = rest % H; rest /= H;
        int c = rest % C; int n = rest / C;
        T total = 0;
        for (int ky = 0; ky < kh; ++ky) {
            int y = h + py - ky;
            if (y < 0 || y % sy != 0 || y / sy >= OH) continue;
            for (int kx = 0; kx < kw; ++kx) {
                int z = w + px - kx;
                if (z < 0 || z % sx != 0 || z / sx >= OW) continue;
                total += col[((((c * kh + ky) * kw + kx) * N + n) * OH + y / sy) * OW + z / sx];
            }
        }
        x = total;
        """),
    # i indexes out (N, C, OH, OW); relu != 0 also applies ReLU and marks outputs <= 0 with no_winner.
    "maxpool_forward": (
        "raw T x, int32 H, int32 W, int32 kh, int32 kw, int32 OH, int32 OW, "
        "int32 sy, int32 sx, int32 py, int32 px, int32 relu, int32 no_winner",
        "T out, int32 argmax",
        """
        int ox = i % OW; int rest = i / OW;
        int oy = rest % OH; int plane = rest / OH;          // plane = n * C + c
        T best = 0; int winner = 0; bool seen = false;       // padding (-inf) never wins: skipped
        for (int ky = 0; ky < kh; ++ky) {
            int h = oy * sy + ky - py;
            if (h < 0 || h >= H) continue;
            for (int kx = 0; kx < kw; ++kx) {
                int w = ox * sx + kx - px;
                if (w < 0 || w >= W) continue;
                T value = x[(plane * H + h) * W + w];
                if (!seen || value > best) { best = value; winner = ky * kw + kx; seen = true; }
            }
        }
        if (relu && best <= 0) { best = 0; winner = no_winner; }
        out = best; argmax = winner;
        """),
    # i indexes grad_x (N, C, H, W): the grad_out of every window whose winner is (h, w).
    "maxpool_backward": (
        "raw T grad_out, raw int32 argmax, int32 H, int32 W, int32 kh, int32 kw, int32 OH, int32 OW, "
        "int32 sy, int32 sx, int32 py, int32 px",
        "T grad_x",
        """
        int w = i % W; int rest = i / W;
        int h = rest % H; int plane = rest / H;
        T total = 0;
        for (int ky = 0; ky < kh; ++ky) {
            int y = h + py - ky;
            if (y < 0 || y % sy != 0 || y / sy >= OH) continue;
            for (int kx = 0; kx < kw; ++kx) {
                int z = w + px - kx;
                if (z < 0 || z % sx != 0 || z / sx >= OW) continue;
                int o = (plane * OH + y / sy) * OW + z / sx;
                if (argmax[o] == ky * kw + kx) total += grad_out[o];
            }
        }
        grad_x = total;
        """),
    # ReLU: out = max(x, 0) (NaN stays NaN, as xp.maximum), positive = out > 0. x is raw (read at
    # i before out is written at i), so out may be x itself (inplace=True).
    "relu_mask": (
        "raw T x", "T out, bool positive",
        """
        T value = x[i];
        out = (value > 0 || value != value) ? value : (T)0;
        positive = value > 0;
        """),
    "relu": ("raw T x", "T out", "T value = x[i]; out = (value > 0 || value != value) ? value : (T)0;"),
    # BatchNorm2d (scale, shift, k, c broadcast as (C, 1, 1)): the readable code's passes, rounded as they are.
    "scale_shift": ("T x, T scale, T shift", "T out", "T scaled = x * scale; out = scaled + shift;"),
    "batchnorm_grad_x": (
        "T grad, T x_centered, T scale, T k, T c", "T grad_x",
        """
        T value = grad * scale;
        T centered = x_centered * k;
        value = value - centered;
        grad_x = value - c;
        """),
    "sgd": (
        "T grad, T lr, T momentum, T weight_decay, int32 nesterov, int32 first_step",
        "T param, T velocity",
        """
        T g = grad;
        if (weight_decay != 0) g = g + weight_decay * param;
        velocity = first_step ? g : momentum * velocity + g;
        if (nesterov) g = g + momentum * velocity; else g = velocity;
        param -= lr * g;
        """),
    # decay = 1 - lr * weight_decay for AdamW (1 for Adam); l2 = weight_decay for Adam (0 for AdamW).
    "adam": (
        "T grad, T step_size, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, T eps, T l2, T decay, "
        "T bias2_sqrt",
        "T param, T exp_avg, T exp_avg_sq",
        """
        param *= decay;
        T g = grad;
        if (l2 != 0) g = g + l2 * param;
        exp_avg = beta1 * exp_avg + one_minus_beta1 * g;
        exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * g * g;
        param -= step_size * exp_avg / (sqrt(exp_avg_sq) / bias2_sqrt + eps);
        """),
}


def im2col(x, kernel, stride, padding, out_hw):
    """im2col.im2col in one launch: x (N, C, H, W) -> col (C, kh, kw, N, OH, OW)."""
    import cupy
    (kh, kw), (sy, sx), (py, px), (oh, ow) = kernel, stride, padding, out_hw
    n, c, h, w = x.shape
    col = cupy.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    _kernel("im2col")(cupy.ascontiguousarray(x), c, h, w, kh, kw, n, oh, ow, sy, sx, py, px, col)
    return col


def col2im(col, in_shape, stride, padding):
    """im2col.col2im in one launch: col (C, kh, kw, N, OH, OW) -> x (N, C, H, W)."""
    import cupy
    c, kh, kw, n, oh, ow = col.shape
    (sy, sx), (py, px) = stride, padding
    _, _, h, w = in_shape
    x = cupy.empty((n, c, h, w), dtype=col.dtype)
    _kernel("col2im")(cupy.ascontiguousarray(col), c, h, w, kh, kw, n, oh, ow, sy, sx, py, px, x)
    return x


def maxpool_forward(x, kernel, stride, padding, out_hw, relu: bool, no_winner: int):
    """MaxPool2d's forward in one launch: (out (N, C, OH, OW), argmax int32)."""
    import cupy
    (kh, kw), (sy, sx), (py, px), (oh, ow) = kernel, stride, padding, out_hw
    n, c, h, w = x.shape
    out = cupy.empty((n, c, oh, ow), dtype=x.dtype)
    argmax = cupy.empty((n, c, oh, ow), dtype=cupy.int32)
    _kernel("maxpool_forward")(cupy.ascontiguousarray(x), h, w, kh, kw, oh, ow, sy, sx, py, px,
                               int(relu), no_winner, out, argmax)
    return out, argmax


def maxpool_backward(grad_output, argmax, x_shape, kernel, stride, padding):
    """MaxPool2d's backward in one launch: grad_x (N, C, H, W)."""
    import cupy
    (kh, kw), (sy, sx), (py, px) = kernel, stride, padding
    n, c, h, w = x_shape
    oh, ow = grad_output.shape[2:]
    grad_x = cupy.empty(x_shape, dtype=grad_output.dtype)
    _kernel("maxpool_backward")(cupy.ascontiguousarray(grad_output), cupy.ascontiguousarray(argmax, dtype=cupy.int32),
                                h, w, kh, kw, oh, ow, sy, sx, py, px, grad_x)
    return grad_x


def sgd_update(param, grad, velocity, lr, momentum, weight_decay, nesterov, first_step) -> None:
    """optim.SGD.update with momentum in one launch (param and velocity updated in place)."""
    dtype = param.dtype.type
    _kernel("sgd")(grad, dtype(lr), dtype(momentum), dtype(weight_decay), int(nesterov), int(first_step),
                   param, velocity)


def adam_update(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, decoupled, step) -> None:
    """optim.Adam/AdamW.update in one launch (param, exp_avg, exp_avg_sq updated in place)."""
    import math
    dtype = param.dtype.type
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    l2 = 0.0 if decoupled else weight_decay
    # 1 - beta is computed in double, as the readable code's Python floats are (1 - 0.9 rounds
    # differently in float32).
    _kernel("adam")(grad, dtype(lr / (1.0 - beta1 ** step)), dtype(beta1), dtype(1.0 - beta1), dtype(beta2),
                    dtype(1.0 - beta2), dtype(eps), dtype(l2), dtype(decay), dtype(math.sqrt(1.0 - beta2 ** step)),
                    param, exp_avg, exp_avg_sq)


def relu_forward(x, inplace: bool, keep_mask: bool):
    """ReLU.forward for a C-contiguous x in one launch: (max(x, 0), the bool mask out > 0 or None)."""
    import cupy
    out = x if inplace else cupy.empty_like(x)
    if not keep_mask:
        _kernel("relu")(x, out)
        return out, None
    positive = cupy.empty(x.shape, dtype=cupy.bool_)
    _kernel("relu_mask")(x, out, positive)
    return out, positive


def channel_dot(a, b):
    """BatchNorm's sum over n, h, w of a * b per channel, (N, C, H, W) x2 -> (C,), in one reduction."""
    return _channel_dot_kernel()(a, b, axis=(0, 2, 3))


def scale_shift(x, scale, shift):
    """x * scale[c] + shift[c] for x (N, C, H, W) in one pass (BatchNorm2d's output)."""
    return _kernel("scale_shift")(x, scale[:, None, None], shift[:, None, None])


def batchnorm_grad_x(grad, x_centered, scale, k, c):
    """grad * scale[c] - x_centered * k[c] - c[c] in one pass (BatchNorm2d's input gradient)."""
    return _kernel("batchnorm_grad_x")(grad, x_centered, scale[:, None, None], k[:, None, None], c[:, None, None])
