"""Residual blocks: out = relu(F(x) + shortcut(x)), the idea behind ResNet."""
from __future__ import annotations

import numpy as np

from ..module import Module, Sequential
from .activation import ReLU
from .batchnorm import BatchNorm2d
from .conv import Conv2d


class BasicBlock(Module):
    """ResNet-18/34's block, exactly as torchvision.models.resnet.BasicBlock:

        main     = bn2(conv2(relu(bn1(conv1(x)))))     conv1 3x3 stride s, conv2 3x3 stride 1, no biases
        shortcut = x                  when downsample is None
                   downsample(x)      otherwise, usually Sequential(Conv2d 1x1 stride s, BatchNorm2d)
        out      = relu(main + shortcut)

    Shapes: x (N, in_planes, H, W) -> out (N, planes, OH, OW), OH = (H - 1) // s + 1.
    The shortcut must produce the same shape as the main branch, so a block that
    changes the channel count or the stride needs a ``downsample``.

    Attribute names (conv1, bn1, conv2, bn2, downsample) are torchvision's, so
    state_dict keys match: ``conv1.weight``, ``downsample.0.weight``, ``downsample.1.running_mean``.
    torchvision uses one ReLU module twice; here there are two (``relu1``, ``relu2``),
    because each ReLU keeps its own mask for backward. ReLU has no state_dict entries.
    Both work in place, as torchvision's: their inputs (bn1's output, the residual sum)
    are fresh arrays that nothing else keeps.
    """

    expansion = 1  # output channels = planes * expansion (4 in ResNet-50's Bottleneck)

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: Module | None = None,
                 *, rng=None, dtype=np.float32):
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        self.conv1 = Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False, rng=rng, dtype=dtype)
        self.bn1 = BatchNorm2d(planes, dtype=dtype)
        self.relu1 = ReLU(inplace=True)
        self.conv2 = Conv2d(planes, planes, 3, stride=1, padding=1, bias=False, rng=rng, dtype=dtype)
        self.bn2 = BatchNorm2d(planes, dtype=dtype)
        self.downsample = downsample
        self.relu2 = ReLU(inplace=True)

    def extra_repr(self):
        return f"{self.in_planes}, {self.planes}, stride={self.stride}"

    def forward(self, x):
        """x (N, in_planes, H, W) -> (N, planes, OH, OW)."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))                           # main branch F(x)
        shortcut = x if self.downsample is None else self.downsample(x)
        if shortcut.shape != out.shape:
            raise ValueError(f"BasicBlock: the shortcut has shape {tuple(shortcut.shape)} but the main branch "
                             f"{tuple(out.shape)}; a block that changes stride or channels needs a downsample")
        out += shortcut                                           # in place: out is bn2's fresh output
        return self.relu2(out)

    # Backward. With s = main + shortcut and out = relu(s):
    #   dL/ds        = relu2.backward(G)
    #   dL/dmain     = dL/ds      and   dL/dshortcut = dL/ds
    #     (d(a + b)/da = d(a + b)/db = 1: the add copies its gradient to both branches)
    #   dL/dx        = main.backward(dL/ds) + shortcut.backward(dL/ds)
    #     (x feeds both branches, so its two gradient contributions add up;
    #      for the identity shortcut, shortcut.backward is the identity)
    def backward(self, grad_output):
        grad_sum = self.relu2.backward(grad_output)               # (N, planes, OH, OW)

        grad = self.bn2.backward(grad_sum)
        grad = self.conv2.backward(grad)
        grad = self.bn1.backward(self.relu1.backward(grad))
        grad_x = self.conv1.backward(grad)                        # (N, in_planes, H, W)

        grad_shortcut = grad_sum if self.downsample is None else self.downsample.backward(grad_sum)
        if grad_x is None:  # conv1.needs_input_grad was switched off
            return None
        grad_x += grad_shortcut                                   # the two paths from x add up (grad_x is
        return grad_x                                             # conv1's fresh result: add in place)


def make_downsample(in_planes: int, planes: int, stride: int, *, rng=None, dtype=np.float32) -> Sequential:
    """torchvision's shortcut projection: Sequential(Conv2d 1x1 stride s no bias, BatchNorm2d)."""
    return Sequential(Conv2d(in_planes, planes, 1, stride=stride, bias=False, rng=rng, dtype=dtype),
                      BatchNorm2d(planes, dtype=dtype))
