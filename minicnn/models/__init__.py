"""Ready-made networks built from minicnn layers."""
from .resnet import (IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, ResNet,
                     backbone_parameters, gray_filters, head_parameters, load_pretrained, replace_fc, resnet18,
                     to_grayscale_conv1)

__all__ = ["ResNet", "resnet18", "replace_fc", "backbone_parameters", "head_parameters", "to_grayscale_conv1",
           "gray_filters", "load_pretrained", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_GRAY_MEAN",
           "IMAGENET_GRAY_STD"]
