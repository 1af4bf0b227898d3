"""Layers with hand-written backward passes. One file per idea."""
from .activation import ReLU
from .batchnorm import BatchNorm2d
from .conv import Conv2d
from .dropout import Dropout
from .flatten import Flatten
from .linear import Linear
from .pool import AdaptiveAvgPool2d, MaxPool2d
from ..module import Sequential

__all__ = ["BatchNorm2d", "Conv2d", "MaxPool2d", "AdaptiveAvgPool2d", "ReLU", "Linear", "Flatten", "Dropout", "Sequential"]
from .residual import BasicBlock, make_downsample

__all__ += ["BasicBlock", "make_downsample"]
