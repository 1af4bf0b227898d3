"""The two-conv / three-FC classifier family, built from minicnn layers.

    conv -> ReLU -> max-pool -> conv -> ReLU -> max-pool -> FC -> ReLU -> FC -> ReLU -> FC(2)

A ``ModelConfig`` describes one member of the family; it is stored in every
checkpoint as JSON, so a checkpoint rebuilds its exact model with no flags.

Presets:
  seed     the 2020 report's CNNv3 exactly: 1x224x224, conv 1->32 3x3 pad 1, pool 2,
           conv 32->64 3x3, pool 2, FC 64*55*55 = 193,600 -> 1000 -> 500 -> 2
           (~194M parameters: their checkpoints were over 700 MB). Slow; for reproduction.
  default  the same family sized for CPU training and accuracy: 128x128 input, a
           strided first conv and a 4x4 second pool before the FC block (2,048 features).
           No dropout: on both the phantom and the real validation split it only slowed
           learning (see README, "Real-data results").
  wide     default with twice the filters (32 and 64) and a 256-unit first FC layer (4x the
           parameters, ~2.5x the training time). Cross-validated (README "Cross-validated
           results") it is within the noise of default: 0.807 against 0.801 AUC with the old
           augmentation, 0.812 against 0.817 with flips only.
  tiny     a very small member for tests and smoke runs.
  deep     (other family) 4 conv+BatchNorm blocks and global average pooling.
  deep-small  deep with half the filters (8, 16, 32, 64): ~2x the default's training time.
           Alone it cross-validates below default, but it errs elsewhere: as a second
           member beside default it adds more than a second seed (README, "Cross-validated
           results"); the real-data default trains both.
  resnet18 (other family) torchvision's ResNet-18 with 1-channel input and a 2-way head;
           start it from ImageNet weights with ``covidct train --pretrained resnet18-f37072fd.pth``.
  resnet-small  a ResNet-10 (one BasicBlock per stage) at a quarter of the width (16 to 128
           channels), 128x128 input: about deep-small's cost.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np

import minicnn as mc
from minicnn.models.resnet import BACKBONE as RESNET_BACKBONE
from minicnn.models.resnet import ResNet

from .errors import CovidCTError


@dataclass
class ConvBlock:
    """conv(out_channels, kernel, stride, padding) -> ReLU -> max-pool(pool)."""
    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    pool: int = 2


@dataclass
class ModelConfig:
    input_size: int = 128
    in_channels: int = 1
    conv1: ConvBlock = field(default_factory=lambda: ConvBlock(16, kernel=5, stride=2, padding=2, pool=2))
    conv2: ConvBlock = field(default_factory=lambda: ConvBlock(32, kernel=3, stride=1, padding=1, pool=4))
    hidden: tuple[int, int] = (128, 64)
    dropout: float = 0.0
    num_classes: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CovidCTError(f"model config has unknown fields {sorted(unknown)}; expected {sorted(known)}")
        data = dict(data)
        for name in ("conv1", "conv2"):
            if isinstance(data.get(name), dict):
                data[name] = ConvBlock(**data[name])
        if "hidden" in data:
            data["hidden"] = tuple(data["hidden"])
        return cls(**data)

    def feature_shape(self) -> tuple[int, int, int]:
        """(C, H, W) after the two conv blocks, i.e. what the FC block sees."""
        size = self.input_size
        for block in (self.conv1, self.conv2):
            size = (size + 2 * block.padding - block.kernel) // block.stride + 1
            size //= block.pool
            if size < 1:
                raise CovidCTError(f"input size {self.input_size} is too small for this network: "
                                   f"the feature map shrinks to nothing")
        return self.conv2.out_channels, size, size


@dataclass
class DeepConfig:
    """A deeper conv stack with global average pooling (not the two-conv family):

        [conv3x3 -> BatchNorm -> ReLU -> max-pool 2] x len(channels) -> global avg pool -> FC -> ReLU -> FC(2)
    """
    input_size: int = 128
    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    hidden: int = 64
    dropout: float = 0.3
    batchnorm: bool = True
    num_classes: int = 2
    arch: str = "deep"

    def to_dict(self) -> dict:
        return asdict(self)

    def feature_shape(self) -> tuple[int, int, int]:
        size = self.input_size
        for _ in self.channels:
            size //= 2
            if size < 1:
                raise CovidCTError(f"input size {self.input_size} is too small for this network: "
                                   f"the feature map shrinks to nothing")
        return self.channels[-1], 1, 1


@dataclass
class ResNetConfig:
    """torchvision's ResNet-18 (minicnn.models.resnet18) with a 2-way head and 1-channel input;
    ``layers`` (BasicBlocks per stage) and ``width`` (conv1's channels) size other members of the
    family (minicnn.models.ResNet)."""
    input_size: int = 224
    in_channels: int = 1
    num_classes: int = 2
    layers: tuple[int, ...] = (2, 2, 2, 2)
    width: int = 64
    arch: str = "resnet18"

    def to_dict(self) -> dict:
        return asdict(self)

    def feature_shape(self) -> tuple[int, int, int]:
        if self.input_size < 32:
            raise CovidCTError(f"input size {self.input_size} is too small for a ResNet; use at least 32")
        return 8 * self.width, 1, 1


PRESETS = {
    "seed": ModelConfig(input_size=224, conv1=ConvBlock(32, 3, 1, 1, 2), conv2=ConvBlock(64, 3, 1, 0, 2),
                        hidden=(1000, 500), dropout=0.0),
    "default": ModelConfig(),
    "wide": ModelConfig(conv1=ConvBlock(32, kernel=5, stride=2, padding=2, pool=2),
                        conv2=ConvBlock(64, kernel=3, stride=1, padding=1, pool=4), hidden=(256, 64)),
    "deep": DeepConfig(),
    "deep-small": DeepConfig(channels=(8, 16, 32, 64)),
    "resnet18": ResNetConfig(),
    "resnet-small": ResNetConfig(input_size=128, layers=(1, 1, 1, 1), width=16),
    "tiny": ModelConfig(input_size=32, conv1=ConvBlock(4, 3, 1, 1, 2), conv2=ConvBlock(8, 3, 1, 1, 2),
                        hidden=(16, 8), dropout=0.1),
}


def preset(name: str):
    if name not in PRESETS:
        raise CovidCTError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return config_from_dict(PRESETS[name].to_dict())  # a fresh copy


def config_from_dict(data: dict):
    """ModelConfig or DeepConfig, from the dict stored in a checkpoint."""
    if data.get("arch") == "resnet18":
        return ResNetConfig(**dict(data, layers=tuple(data.get("layers", (2, 2, 2, 2)))))
    if data.get("arch") == "deep":
        data = dict(data, channels=tuple(data["channels"]))
        return DeepConfig(**data)
    return ModelConfig.from_dict(data)


def build_model(config, seed: int = 0) -> mc.Sequential:
    """The network for ``config``, weights drawn from ``numpy.random.default_rng(seed)``."""
    if isinstance(config, DeepConfig):
        return build_deep(config, seed)
    if isinstance(config, ResNetConfig):
        config.feature_shape()
        return ResNet(config.layers, config.num_classes, config.in_channels, width=config.width,
                      rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    c1, c2 = config.conv1, config.conv2
    channels, height, width = config.feature_shape()
    first_conv = mc.Conv2d(config.in_channels, c1.out_channels, c1.kernel, c1.stride, c1.padding, rng=rng)
    first_conv.needs_input_grad = False  # the image itself needs no gradient
    layers = [
        first_conv, mc.ReLU(), mc.MaxPool2d(c1.pool),
        mc.Conv2d(c1.out_channels, c2.out_channels, c2.kernel, c2.stride, c2.padding, rng=rng), mc.ReLU(),
        mc.MaxPool2d(c2.pool),
        mc.Flatten(),
        mc.Linear(channels * height * width, config.hidden[0], rng=rng), mc.ReLU(),
    ]
    if config.dropout:
        layers.append(mc.Dropout(config.dropout, rng=rng))
    layers += [mc.Linear(config.hidden[0], config.hidden[1], rng=rng), mc.ReLU()]
    if config.dropout:
        layers.append(mc.Dropout(config.dropout, rng=rng))
    layers.append(mc.Linear(config.hidden[1], config.num_classes, rng=rng))
    return mc.Sequential(*layers)


def build_deep(config: DeepConfig, seed: int = 0) -> mc.Sequential:
    rng = np.random.default_rng(seed)
    config.feature_shape()
    layers, in_channels = [], config.in_channels
    for out_channels in config.channels:
        layers.append(mc.Conv2d(in_channels, out_channels, 3, padding=1, bias=not config.batchnorm, rng=rng))
        if config.batchnorm:
            layers.append(mc.BatchNorm2d(out_channels))
        layers += [mc.ReLU(), mc.MaxPool2d(2)]
        in_channels = out_channels
    layers[0].needs_input_grad = False
    layers += [mc.AdaptiveAvgPool2d(1), mc.Flatten(), mc.Linear(in_channels, config.hidden, rng=rng), mc.ReLU()]
    if config.dropout:
        layers.append(mc.Dropout(config.dropout, rng=rng))
    layers.append(mc.Linear(config.hidden, config.num_classes, rng=rng))
    return mc.Sequential(*layers)


def split_backbone_head(model) -> tuple[mc.Sequential, mc.Module]:
    """(backbone, head) sharing the model's layers: the feature extractor and the classifier.

    ResNet-18: conv1 ... avgpool + flatten | fc.  Two-conv and deep models: every layer up
    to and including Flatten | the FC block after it. ``head(backbone(x))`` equals
    ``model(x)``; freezing the backbone means training the head on fixed features.
    """
    if isinstance(model, ResNet):
        return mc.Sequential(*[getattr(model, name) for name in RESNET_BACKBONE]), model.fc
    layers = list(model)
    flatten = next((i for i, layer in enumerate(layers) if isinstance(layer, mc.Flatten)), None)
    if flatten is None:
        raise CovidCTError(f"cannot split {type(model).__name__} into backbone and head: it has no Flatten")
    return mc.Sequential(*layers[:flatten + 1]), mc.Sequential(*layers[flatten + 1:])


def count_parameters(model: mc.Module) -> int:
    return sum(int(np.prod(p.shape)) for p in model.parameters())


def count_multiply_adds(model: mc.Module, input_shape) -> int:
    """Multiply-adds of one forward pass of one input of shape (C, H, W): every Conv2d's and Linear's,
    counted while a zero image runs through the model (each output element costs its weight's
    fan-in, weight.shape[1:]). Training costs about three times this per image; covidct.cv uses it to
    start the slowest fold models first."""
    total = 0
    layers = [module for module in model.modules() if isinstance(module, (mc.Conv2d, mc.Linear))]

    def counting(layer):
        forward = layer.forward

        def forward_and_count(x):
            nonlocal total
            output = forward(x)
            total += int(output.size) * int(np.prod(layer.weight.shape[1:]))
            return output
        return forward_and_count

    dtype = next(iter(model.parameters())).data.dtype
    was_training = model.training
    for layer in layers:
        layer.forward = counting(layer)                 # an instance attribute shadows the method
    try:
        with mc.no_grad():
            model.eval()(np.zeros((1, *input_shape), dtype))
    finally:
        for layer in layers:
            del layer.forward
        model.train(was_training)
    return total
