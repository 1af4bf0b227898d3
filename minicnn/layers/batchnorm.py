"""Batch normalisation over the channels of NCHW feature maps."""
from __future__ import annotations

import numpy as np

from ..backend import check_same_device, get_array_module
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
        axes = (0, 2, 3)
        if self.training:
            count = x.size // self.num_features                       # M = N*H*W values per channel
            if count < 2:
                raise ValueError(f"BatchNorm2d: training needs more than 1 value per channel, got input {tuple(x.shape)}")
            mean = x.mean(axis=axes)                                  # (C,)
            var = x.var(axis=axes)                                    # (C,) biased
            m = self.momentum
            self.running_mean = (1 - m) * self.running_mean + m * mean.astype(self.running_mean.dtype)
            self.running_var = (1 - m) * self.running_var + m * (var * (count / (count - 1))).astype(self.running_var.dtype)
            self.num_batches_tracked = self.num_batches_tracked + 1
        else:
            mean, var = self.running_mean.astype(x.dtype), self.running_var.astype(x.dtype)
        inv_std = 1.0 / xp.sqrt(var + self.eps)                       # (C,)
        x_hat = (x - mean[:, None, None]) * inv_std[:, None, None]    # (N, C, H, W)
        self.save_for_backward(x_hat, inv_std, self.training)
        return x_hat * self.weight.data[:, None, None] + self.bias.data[:, None, None]

    # Backward, per channel with M = N*H*W values and G = grad_out:
    #   dL/dbeta  = sum G                 dL/dgamma = sum G * x_hat
    #   train: mean and var depend on x, which gives the compact form
    #     dL/dx = gamma * inv_std / M * (M * G - sum G - x_hat * sum(G * x_hat))
    #   eval: the statistics are constants:  dL/dx = gamma * inv_std * G
    def backward(self, grad_output):
        x_hat, inv_std, training = self.saved_for_backward()
        axes = (0, 2, 3)
        grad_bias = grad_output.sum(axis=axes)
        grad_weight = (grad_output * x_hat).sum(axis=axes)
        self.weight.accumulate_grad(grad_weight)
        self.bias.accumulate_grad(grad_bias)
        scale = (self.weight.data * inv_std)[:, None, None]              # (C, 1, 1)
        if not training:
            return grad_output * scale
        count = grad_output.size // self.num_features
        return (scale / count) * (count * grad_output - grad_bias[:, None, None]
                                  - x_hat * grad_weight[:, None, None])
