"""Ready-made networks built from minicnn layers."""
from .resnet import (IMAGENET_MEAN, IMAGENET_STD, ResNet, backbone_parameters, head_parameters, load_pretrained,
                     replace_fc, resnet18, to_grayscale_conv1)

__all__ = ["ResNet", "resnet18", "replace_fc", "backbone_parameters", "head_parameters", "to_grayscale_conv1",
           "load_pretrained", "IMAGENET_MEAN", "IMAGENET_STD"]
