"""TinyCNN: a three-conv network for micro-controller-class budgets (about 20x fewer
multiply-accumulates than ResNet-20). Plain conv-BN-ReLU blocks that onnxruntime fuses."""

from __future__ import annotations

from torch import nn

from models.base import Classifier, conv_bn_relu


class TinyCNN(Classifier):
    def __init__(self, num_classes: int, in_channels: int, width: int = 16):
        super().__init__()
        self.stem = nn.Identity()
        self.stages = nn.ModuleDict({
            "stage1": nn.Sequential(conv_bn_relu(in_channels, width), nn.MaxPool2d(2)),
            "stage2": nn.Sequential(conv_bn_relu(width, 2 * width), nn.MaxPool2d(2)),
            "stage3": conv_bn_relu(2 * width, 4 * width),
        })
        self.head = nn.Linear(4 * width, num_classes)


def tinycnn(num_classes: int, in_channels: int) -> TinyCNN:
    return TinyCNN(num_classes, in_channels)
