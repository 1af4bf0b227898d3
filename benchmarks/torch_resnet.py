"""torchvision's ResNet-18 (and narrower or shallower ResNets), written out in plain torch.nn
(torchvision is not a dependency).

The benchmarks' PyTorch side of ``minicnn.models.resnet18``. Module names are
torchvision's, which are also minicnn's (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ``fc``, ...), so minicnn's ``state_dict`` loads into it
with ``strict=True``: ``common.torch_layer_from(minicnn_resnet)`` builds one of
these and copies the weights, BatchNorm statistics included.

As in torchvision, the ReLUs are in place and each block uses one ReLU module
twice. Imports torch only when called, so importing this module costs nothing.
"""
from __future__ import annotations


def torch_resnet18(num_classes: int = 1000, in_channels: int = 3):
    """An untrained torch ResNet-18 (BasicBlock, layers 2-2-2-2), torchvision's architecture."""
    return torch_resnet((2, 2, 2, 2), num_classes, in_channels)


def torch_resnet(layers=(2, 2, 2, 2), num_classes: int = 1000, in_channels: int = 3, width: int = 64):
    """An untrained torch ResNet of BasicBlocks (``layers`` per stage, conv1 ``width`` channels,
    doubling per stage), as ``minicnn.models.ResNet``."""
    import torch
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, in_planes, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            in_planes = width
            for index, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), layers)):
                stride = 1 if index == 0 else 2
                downsample = None
                if stride != 1 or in_planes != planes:
                    downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                               nn.BatchNorm2d(planes))
                stage = [BasicBlock(in_planes, planes, stride, downsample)]
                stage += [BasicBlock(planes, planes) for _ in range(1, blocks)]
                setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
                in_planes = planes
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(in_planes, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet()
