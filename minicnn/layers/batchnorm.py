"""Batch normalisation over the channels of NCHW feature maps."""
from __future__ import annotations

import numpy as np

from .. import cuda_kernels, fast
from ..backend import check_same_device, get_array_module
from ..grad_mode import is_grad_enabled
from ..module import Module, Parameter


class BatchNorm2d(Module):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel c.

    Shapes: x (N, C, H, W) -> y (N, C, H, W); weight (gamma) and bias (beta) (C,).
    Train mode: mean and (biased) var over the N*H*W values of each channel, and
        running_mean <- (1 - momentum) * running_mean + momentum * mean
        running_var  <- (1 - momentum) * running_var  + momentum * var * M / (M - 1)   (unbiased)
    Eval mode: the running statistics instead. The same as torch.nn.BatchNorm2d,
    including the state_dict keys (weight, bias, running_mean, running_var, num_batches_tracked).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, *, dtype=np.float32):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype=dtype))  # host-ok
        self.bias = Parameter(np.zeros(num_features, dtype=dtype))  # host-ok
        self.register_buffer("running_mean", np.zeros(num_features, dtype=dtype))  # host-ok
        self.register_buffer("running_var", np.ones(num_features, dtype=dtype))  # host-ok
        self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))  # host-ok

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x):
        if getattr(x, "ndim", None) != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d: expected input of shape (N, {self.num_features}, H, W), "
                             f"got shape {getattr(x, 'shape', type(x))}")
        check_same_device("BatchNorm2d", x, self.weight.data)
        xp = get_array_module(x)
        if self.training:
            count = x.size // self.num_features                       # M = N*H*W values per channel
            if count < 2:
                raise ValueError(f"BatchNorm2d: training needs more than 1 value per channel, got input {tuple(x.shape)}")
            mean = x.mean(axis=(0, 2, 3))                             # (C,)
            x_centered = x - mean[:, None, None]                      # (N, C, H, W)
            var = channel_dot(x_centered, x_centered) / count         # (C,) biased
            m = self.momentum
            self.running_mean = (1 - m) * self.running_mean + m * mean.astype(self.running_mean.dtype)
            self.running_var = (1 - m) * self.running_var + m * (var * (count / (count - 1))).astype(self.running_var.dtype)
            self.num_batches_tracked = self.num_batches_tracked + 1
        else:
            mean, var = self.running_mean.astype(x.dtype), self.running_var.astype(x.dtype)
            x_centered = x - mean[:, None, None]
        inv_std = 1.0 / xp.sqrt(var + self.eps)                       # (C,)
        # y = x_hat * gamma + beta with x_hat = x_centered * inv_std, folded into one scale
        # per channel. With var from x_centered (channel_dot, not x.var, which re-computes
        # the mean and squares into a temporary), the train forward reads the data 5 times
        # instead of 9. Backward works from x_centered and inv_std: x_hat is never stored.
        if fast.use_fast_path(x):                                     # the same two passes, in batch chunks
            out = fast.scale_shift(x_centered, self.weight.data * inv_std, self.bias.data,
                                   in_place=not is_grad_enabled())   # no_grad: x_centered is not kept
        elif cuda_kernels.enabled(x):                                 # CuPy: the same two passes in one launch
            out = cuda_kernels.scale_shift(x_centered, self.weight.data * inv_std, self.bias.data)
        else:
            out = x_centered * (self.weight.data * inv_std)[:, None, None]
            out += self.bias.data[:, None, None]
        self.save_for_backward(x_centered, inv_std, self.training)
        return out

    # Backward, per channel with M = N*H*W values, G = grad_out, x_hat = (x - mean) * inv_std:
    #   dL/dbeta  = sum G                 dL/dgamma = sum G * x_hat
    #   train: mean and var depend on x, which gives the compact form
    #     dL/dx = gamma * inv_std / M * (M * G - sum G - x_hat * sum(G * x_hat))
    #   eval: the statistics are constants:  dL/dx = gamma * inv_std * G
    # Computed as scale * G - x_centered * k - c with per-channel constants
    #   scale = gamma * inv_std,  k = scale * inv_std * dL/dgamma / M,  c = scale * dL/dbeta / M,
    # in 6 passes over the data with one (N, C, H, W) temporary (the form above: 8 passes, 5 temporaries).
    def backward(self, grad_output):
        x_centered, inv_std, training = self.saved_for_backward()
        grad_bias = grad_output.sum(axis=(0, 2, 3))
        grad_weight = channel_dot(grad_output, x_centered) * inv_std   # sum G * x_hat
        self.weight.accumulate_grad(grad_weight)
        self.bias.accumulate_grad(grad_bias)
        scale = self.weight.data * inv_std                                # (C,)
        count = grad_output.size // self.num_features
        if fast.use_fast_path(grad_output, x_centered):                  # the same passes, in batch chunks
            k, c = (scale * inv_std * grad_weight / count, scale * grad_bias / count) if training else (None, None)
            return fast.batchnorm_backward_elementwise(grad_output, x_centered, scale, k, c)
        if training and cuda_kernels.enabled(grad_output, x_centered):  # CuPy: the three passes in one launch
            return cuda_kernels.batchnorm_grad_x(grad_output, x_centered, scale, scale * inv_std * grad_weight / count,
                                                 scale * grad_bias / count)
        grad_x = grad_output * scale[:, None, None]
        if not training:
            return grad_x
        grad_x -= x_centered * (scale * inv_std * grad_weight / count)[:, None, None]
        grad_x -= (scale * grad_bias / count)[:, None, None]
        return grad_x


def channel_dot(a, b):
    """sum over n, h, w of a * b, per channel: (N, C, H, W) x2 -> (C,). One pass, no
    (N, C, H, W) temporary (``(a * b).sum(axis=(0, 2, 3))`` would allocate one)."""
    if cuda_kernels.enabled(a, b):                 # CuPy's einsum costs ~0.3 ms of Python per call
        return cuda_kernels.channel_dot(a, b)
    xp = get_array_module(a, b)
    return xp.einsum("nchw,nchw->c", a, b)
