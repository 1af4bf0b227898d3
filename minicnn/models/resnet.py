"""ResNet-18 with torchvision's module names, so torchvision's weights load as they are.

    conv1 7x7/2 -> bn1 -> relu -> maxpool 3x3/2          (N, 3, 224, 224) -> (N, 64, 56, 56)
    layer1: 2 BasicBlocks,  64 channels, stride 1        -> (N,  64, 56, 56)
    layer2: 2 BasicBlocks, 128 channels, stride 2        -> (N, 128, 28, 28)
    layer3: 2 BasicBlocks, 256 channels, stride 2        -> (N, 256, 14, 14)
    layer4: 2 BasicBlocks, 512 channels, stride 2        -> (N, 512,  7,  7)
    avgpool (global) -> flatten -> fc                    -> (N, 512) -> (N, num_classes)

Typical transfer learning (see docs/resnet.md)::

    model = resnet18()                                   # 1000 ImageNet classes
    load_pretrained(model, "resnet18-f37072fd.pth")      # torchvision's file, read without torch
    to_grayscale_conv1(model)                            # optional: 1-channel CT slices
    replace_fc(model, num_classes=2, rng=rng)            # a new head for our task
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import init
from ..backend import get_array_module
from ..grad_mode import no_grad
from ..layers import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU
from ..layers.residual import BasicBlock, make_downsample
from ..module import Module, Sequential, forward_in_order

# torchvision's ImageNet normalisation, per RGB channel, for images scaled to [0, 1]:
#   x_normalised = (x - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# One gray channel made of the three (a CT slice fed to ImageNet weights): the channel statistics averaged.
IMAGENET_GRAY_MEAN = round(sum(IMAGENET_MEAN) / 3, 6)      # 0.449
IMAGENET_GRAY_STD = round(sum(IMAGENET_STD) / 3, 6)        # 0.226

# The modules that run in order; ResNet.forward and .backward walk this list.
BACKBONE = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "flatten")
HEAD = ("fc",)


class ResNet(Module):
    """ResNet with BasicBlocks (ResNet-18: ``layers=(2, 2, 2, 2)``), as torchvision.models.ResNet.

    Shapes: x (N, in_channels, H, W) -> logits (N, num_classes). Any H, W >= 32 or so
    works (the network downsamples by 32, then averages globally).

    Initialisation as torchvision: convolutions kaiming_normal(mode="fan_out",
    nonlinearity="relu"), BatchNorm weight 1 and bias 0, fc PyTorch's Linear default.

    ``conv1.needs_input_grad`` is False (the image needs no gradient), so
    ``backward`` returns None; set it to True for a gradient wrt the input
    (saliency maps, gradient checks).

    ``width``: the channels of conv1 and layer1 (64 in torchvision); layer2..4 double
    it each (ResNet-18 at width 16 has a sixteenth of the weights).
    """

    def __init__(self, layers=(2, 2, 2, 2), num_classes: int = 1000, in_channels: int = 3, *,
                 width: int = 64, rng=None, dtype=np.float32):
        rng = rng if rng is not None else init.default_rng()
        self.num_classes, self.in_channels, self.width = num_classes, in_channels, width
        self.conv1 = Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False, rng=rng, dtype=dtype)
        self.conv1.needs_input_grad = False
        self.bn1 = BatchNorm2d(width, dtype=dtype)
        self.relu = ReLU()
        self.maxpool = MaxPool2d(3, 2, padding=1)
        in_planes = width
        for index, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), layers)):
            stride = 1 if index == 0 else 2
            layer, in_planes = make_layer(in_planes, planes, blocks, stride, rng=rng, dtype=dtype)
            setattr(self, f"layer{index + 1}", layer)
        self.avgpool = AdaptiveAvgPool2d(1)
        self.flatten = Flatten()
        self.fc = Linear(in_planes, num_classes, rng=rng, dtype=dtype)

        for module in self.modules():
            if isinstance(module, Conv2d):
                module.weight.data = init.kaiming_normal(module.weight.shape, mode="fan_out", nonlinearity="relu",
                                                         rng=rng, dtype=dtype)

    def extra_repr(self):
        return f"num_classes={self.num_classes}, in_channels={self.in_channels}, width={self.width}"

    def features(self, x, *, keep_for_backward: bool = True):
        """x (N, in_channels, H, W) -> (N, 8 * width): everything up to and including the flatten.

        For a frozen backbone, compute these once (in eval mode) and train only
        ``fc`` on them. ``keep_for_backward=False`` runs under ``no_grad()``:
        nothing is kept for backward.
        """
        if not keep_for_backward:
            with no_grad():
                return forward_in_order([getattr(self, name) for name in BACKBONE], x)
        return forward_in_order([getattr(self, name) for name in BACKBONE], x)   # relu + maxpool fused

    def forward(self, x):
        """x (N, in_channels, H, W) -> logits (N, num_classes)."""
        return self.fc(self.features(x))

    # Backward: the layers in reverse order; each block adds its shortcut gradient
    # (see BasicBlock.backward). None when conv1.needs_input_grad is False.
    def backward(self, grad_output):
        grad = grad_output                                         # (N, num_classes)
        for name in reversed(BACKBONE + HEAD):
            grad = getattr(self, name).backward(grad)
        return grad


def make_layer(in_planes: int, planes: int, blocks: int, stride: int, *, rng=None, dtype=np.float32):
    """One stage: a first block that may change stride/channels, then blocks that keep them.

    Returns (Sequential of BasicBlocks named "0", "1", ..., output channels).
    """
    downsample = None
    if stride != 1 or in_planes != planes * BasicBlock.expansion:
        downsample = make_downsample(in_planes, planes * BasicBlock.expansion, stride, rng=rng, dtype=dtype)
    stage = [BasicBlock(in_planes, planes, stride, downsample, rng=rng, dtype=dtype)]
    in_planes = planes * BasicBlock.expansion
    stage += [BasicBlock(in_planes, planes, rng=rng, dtype=dtype) for _ in range(1, blocks)]
    return Sequential(*stage), in_planes


def resnet18(num_classes: int = 1000, in_channels: int = 3, *, rng=None, dtype=np.float32) -> ResNet:
    """ResNet-18 (11.7M parameters with 1000 classes), randomly initialised like torchvision's.

    ``rng``: a numpy Generator for the initial weights (default: minicnn.init's generator).
    """
    return ResNet((2, 2, 2, 2), num_classes, in_channels, rng=rng, dtype=dtype)


# -- transfer-learning helpers ------------------------------------------------------------------

def _same_place(array, like):
    """``array`` (host NumPy) moved to the device and dtype of ``like``."""
    xp = get_array_module(like)
    return xp.asarray(array, dtype=like.dtype)


def replace_fc(model: ResNet, num_classes: int, rng=None) -> Linear:
    """Put a fresh ``fc`` Linear(512, num_classes) on the model (same device and dtype); returns it."""
    old = model.fc
    fc = Linear(old.in_features, num_classes, rng=rng, dtype=old.weight.data.dtype)
    fc.map_arrays(lambda array: _same_place(array, old.weight.data))
    model.fc = fc
    model.num_classes = num_classes
    return fc


def backbone_parameters(model: ResNet):
    """Every Parameter except the head's: conv1 ... layer4 (freeze these, or give them a small lr)."""
    head = {id(param) for param in head_parameters(model)}
    return [param for param in model.parameters() if id(param) not in head]


def head_parameters(model: ResNet):
    """The classifier's Parameters: fc.weight and fc.bias."""
    return model.fc.parameters()


def gray_filters(weight):
    """RGB filters (F, 3, kh, kw) -> one gray filter each (F, 1, kh, kw): summed over the colour axis.

    conv(gray, sum_c w[:, c]) = conv([gray, gray, gray], w), so a 1-channel model gives the
    activations the 3-channel one gives for the gray image repeated into its channels.
    """
    return weight.sum(axis=1, keepdims=True)


def to_grayscale_conv1(model: ResNet) -> Conv2d:
    """Turn a 3-channel conv1 into a 1-channel one by summing its weights over the RGB axis.

        w_gray[f, 0, ky, kx] = sum_c w[f, c, ky, kx]      (64, 3, 7, 7) -> (64, 1, 7, 7)

    conv(gray, w_gray) = conv([gray, gray, gray], w): a grayscale image gives the
    same activations as that image repeated into 3 channels, at a third of the
    cost. Exact when the 3 repeated channels would have been normalised alike
    (one mean and std for all channels). Returns the new conv1.
    """
    old = model.conv1
    if old.in_channels == 1:
        return old
    conv = Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None,
                  rng=np.random.default_rng(0), dtype=old.weight.data.dtype)   # replaced below  # host-ok
    conv.weight.data = gray_filters(old.weight.data)                       # stays on the model's device
    if old.bias is not None:
        conv.bias.data = old.bias.data.copy()
    conv.needs_input_grad = old.needs_input_grad
    model.conv1 = conv
    model.in_channels = 1
    return conv


def load_pretrained(model: ResNet, source, *, strict: bool = True) -> ResNet:
    """Load torchvision-style weights into ``model`` from a path (.pth or .npz) or a state_dict.

    torch's BatchNorm accepts files without ``num_batches_tracked`` (torchvision's
    older weight files have none); those entries are filled with 0 here in the same
    way, so such files still load strictly. Returns the model.
    """
    if isinstance(source, dict):
        state = OrderedDict(source)
    else:
        from ..torch_load import load_state_dict_file
        state = load_state_dict_file(source)
    for key in model.state_dict():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = np.array(0, dtype=np.int64)  # host-ok
    model.load_state_dict(state, strict=strict)
    return model
