"""A small MobileNet-style network (Howard et al., "MobileNets", 2017): depthwise-separable
3x3 convolutions (depthwise 3x3 + pointwise 1x1, each with BN and ReLU) in three stages.

The width is a knob: ``mobilenet`` has a 32-channel stem (stages 32->64, 64->128, 128), ``mobilenet:16``
half of that everywhere (about 3.4x fewer multiply-accumulates)."""

from __future__ import annotations

from torch import nn

from models.base import Classifier, conv_bn_relu


def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_relu(cin, cin, 3, stride, groups=cin), conv_bn_relu(cin, cout, 1))


class MobileNet(Classifier):
    def __init__(self, num_classes: int, in_channels: int, width: int = 32):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width)
        self.stages = nn.ModuleDict({
            "stage1": nn.Sequential(separable(width, width, 1), separable(width, 2 * width, 2)),
            "stage2": nn.Sequential(separable(2 * width, 2 * width, 1), separable(2 * width, 4 * width, 2)),
            "stage3": nn.Sequential(separable(4 * width, 4 * width, 1), separable(4 * width, 4 * width, 1)),
        })
        self.head = nn.Linear(4 * width, num_classes)


def mobilenet(num_classes: int, in_channels: int, width: str = "") -> MobileNet:
    """``width``: "" for the default 32, else the stem width (``mobilenet:16``)."""
    if not width:
        return MobileNet(num_classes, in_channels)
    if not width.isdigit() or int(width) < 1:
        raise ValueError(f"mobilenet:{width}: expected a positive stem width, e.g. mobilenet:16")
    return MobileNet(num_classes, in_channels, int(width))
