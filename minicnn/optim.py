"""Optimizers: SGD (momentum, Nesterov), Adam and AdamW, with PyTorch's update rules.

Every optimizer updates ``param.data`` in place from ``param.grad`` and skips
parameters whose grad is None. Per-parameter state (momentum buffers, Adam
moments) lives on the parameter's device and follows it after ``model.to()``.
``state_dict()`` is a flat dict of NumPy arrays, so it can be saved in the
same ``.npz`` checkpoint as the weights and a run can resume exactly.

Parameter groups (discriminative learning rates): pass a list of dicts instead
of a list of parameters, each with its own ``lr_scale`` (default 1.0):

    Adam([{"params": backbone_parameters(model), "lr_scale": 0.1},
          {"params": head_parameters(model)}], lr=1e-3)

A parameter's learning rate is ``optimizer.lr * lr_scale``, so one schedule that
sets ``optimizer.lr`` drives every group and keeps their ratio. (PyTorch stores an
absolute ``lr`` per group instead; its schedulers multiply each one by the same
factor, which is the same thing.)
"""
from __future__ import annotations

import math

import numpy as np

from . import cuda_kernels
from .backend import as_numpy, get_array_module


def flatten_groups(params) -> tuple[list, list[float]]:
    """Parameters, or parameter groups {'params': [...], 'lr_scale': s} -> (parameters, lr scale of each)."""
    params = list(params)
    if not params or not isinstance(params[0], dict):
        return params, [1.0] * len(params)
    flat, scales = [], []
    for group in params:
        unknown = set(group) - {"params", "lr_scale"}
        if unknown:
            raise ValueError(f"parameter group has unknown keys {sorted(unknown)}; expected 'params', 'lr_scale'")
        scale = float(group.get("lr_scale", 1.0))
        if scale < 0:
            raise ValueError(f"parameter group lr_scale must be >= 0, got {scale}")
        members = list(group["params"])
        flat += members
        scales += [scale] * len(members)
    return flat, scales


class Optimizer:
    def __init__(self, params, lr: float, defaults: dict):
        self.params, self.lr_scales = flatten_groups(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if lr <= 0:
            raise ValueError(f"{type(self).__name__}: lr must be > 0, got {lr}")
        self.lr = lr
        self.hyper = defaults
        self.state: list[dict] = [{} for _ in self.params]
        self.step_count = 0

    def zero_grad(self) -> None:
        """Drop all gradients (set to None); the next backward stores fresh ones."""
        for param in self.params:
            param.grad = None

    def buffer(self, index: int, name: str):
        """The named state array of parameter ``index``: zeros at first, on the parameter's device."""
        data = self.params[index].data
        xp = get_array_module(data)
        state = self.state[index]
        if name not in state:
            state[name] = xp.zeros_like(data)
        elif get_array_module(state[name]) is not xp:  # the model moved since the last step
            state[name] = xp.asarray(as_numpy(state[name]))
        return state[name]

    def step(self) -> None:
        self.step_count += 1
        for index, param in enumerate(self.params):
            if param.grad is not None:
                self.update(index, param)

    def update(self, index, param):
        raise NotImplementedError

    def param_lr(self, index: int) -> float:
        """The learning rate of parameter ``index``: lr times its group's lr_scale."""
        return self.lr * self.lr_scales[index]

    def state_dict(self) -> dict:
        """{'step', 'lr', '<i>.<buffer>' ...}: NumPy copies, safe to keep while training goes on."""
        state = {"step": np.array(self.step_count), "lr": np.array(self.lr)}  # host-ok
        for index, buffers in enumerate(self.state):
            for name, value in buffers.items():
                state[f"{index}.{name}"] = np.array(as_numpy(value))  # host-ok
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.lr = float(state["lr"])
        self.state = [{} for _ in self.params]
        for key, array in state.items():
            if key in ("step", "lr"):
                continue
            index, name = key.split(".", 1)
            param = self.params[int(index)]
            if name == "step":  # a per-parameter step count (Adam)
                self.state[int(index)][name] = int(array)
                continue
            if tuple(array.shape) != tuple(param.data.shape):
                raise ValueError(f"{type(self).__name__}.load_state_dict: state '{key}' has shape "
                                 f"{tuple(array.shape)}, parameter has {tuple(param.data.shape)}")
            xp = get_array_module(param.data)
            self.state[int(index)][name] = xp.array(as_numpy(array), dtype=param.data.dtype)


class SGD(Optimizer):
    """g = grad + weight_decay * p
    momentum: v = momentum * v + g (v = g at the first step); g = g + momentum * v if nesterov else v
    p -= lr * g
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        super().__init__(params, lr, dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def update(self, index, param):
        momentum, weight_decay = self.hyper["momentum"], self.hyper["weight_decay"]
        grad = param.grad
        if momentum and cuda_kernels.enabled(param.data, grad):          # CuPy: the same in one launch
            first_step = "momentum_buffer" not in self.state[index]
            cuda_kernels.sgd_update(param.data, grad, self.buffer(index, "momentum_buffer"), self.param_lr(index),
                                    momentum, weight_decay, self.hyper["nesterov"], first_step)
            return
        if weight_decay:
            grad = grad + weight_decay * param.data
        if momentum:
            first_step = "momentum_buffer" not in self.state[index]
            velocity = self.buffer(index, "momentum_buffer")
            if first_step:
                velocity[...] = grad
            else:
                velocity *= momentum
                velocity += grad
            grad = grad + momentum * velocity if self.hyper["nesterov"] else velocity
        param.data -= self.param_lr(index) * grad


class Adam(Optimizer):
    """m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    weight_decay adds weight_decay * p to g (L2, as torch.optim.Adam).
    """

    decoupled_weight_decay = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, lr, dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def update(self, index, param):
        (beta1, beta2), eps, weight_decay = self.hyper["betas"], self.hyper["eps"], self.hyper["weight_decay"]
        grad, lr = param.grad, self.param_lr(index)
        if cuda_kernels.enabled(param.data, grad):                        # CuPy: the same in one launch
            state = self.state[index]
            state["step"] = t = state.get("step", 0) + 1
            cuda_kernels.adam_update(param.data, grad, self.buffer(index, "exp_avg"), self.buffer(index, "exp_avg_sq"),
                                     lr, beta1, beta2, eps, weight_decay, self.decoupled_weight_decay, t)
            return
        if weight_decay and self.decoupled_weight_decay:
            param.data *= 1.0 - lr * weight_decay
        elif weight_decay:
            grad = grad + weight_decay * param.data
        xp = get_array_module(param.data)
        state = self.state[index]
        state["step"] = t = state.get("step", 0) + 1   # steps this parameter took (it may skip some)
        exp_avg, exp_avg_sq = self.buffer(index, "exp_avg"), self.buffer(index, "exp_avg_sq")
        exp_avg *= beta1
        exp_avg += (1.0 - beta1) * grad
        exp_avg_sq *= beta2
        exp_avg_sq += (1.0 - beta2) * grad * grad
        step_size = lr / (1.0 - beta1 ** t)
        denominator = xp.sqrt(exp_avg_sq) / math.sqrt(1.0 - beta2 ** t) + eps
        param.data -= step_size * exp_avg / denominator


class AdamW(Adam):
    """Adam with decoupled weight decay: p *= 1 - lr * weight_decay before the Adam step."""

    decoupled_weight_decay = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)
