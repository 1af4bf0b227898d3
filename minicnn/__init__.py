"""minicnn: a small convolutional-network engine with hand-written backprop.

NumPy on the CPU, CuPy on the GPU (the device follows the data), NCHW layout
and PyTorch-like names, so what you learn here transfers.
"""
from . import fast, gradcheck, init, losses, optim, serialization
from .backend import as_numpy, get_array_module, gpu_available, synchronize, to_device
from .layers import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from .losses import NTXentLoss, SoftmaxCrossEntropy
from .module import Module, Parameter, Sequential
from .init import manual_seed
from .grad_mode import is_grad_enabled, no_grad

__version__ = "0.1.0"

__all__ = [
    "Conv2d", "BatchNorm2d", "MaxPool2d", "AdaptiveAvgPool2d", "ReLU", "Linear", "Flatten", "Dropout", "Sequential", "Module", "Parameter",
    "SoftmaxCrossEntropy", "NTXentLoss", "get_array_module", "gpu_available", "to_device", "as_numpy", "synchronize",
    "manual_seed", "gradcheck", "init", "losses", "optim", "serialization", "no_grad", "is_grad_enabled",
]

# ResNet-18 and the torch-free checkpoint loader.
from .layers import BasicBlock
from . import models, torch_load

__all__ += ["BasicBlock", "models", "torch_load"]

# Data-parallel training (mpi4py and CuPy's NCCL are imported only when a communicator needs them).
from . import distributed

__all__ += ["distributed"]
