"""SmallNet: the student of the seed CIFAR-10 KD notebook (five 3x3 conv-BN-ReLU layers,
three max-pools, global average pooling, one linear layer)."""

from __future__ import annotations

from torch import nn

from models.base import Classifier, conv_bn_relu


class SmallNet(Classifier):
    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Identity()
        self.stages = nn.ModuleDict({
            "stage1": nn.Sequential(conv_bn_relu(in_channels, 32), conv_bn_relu(32, 32), nn.MaxPool2d(2)),
            "stage2": nn.Sequential(conv_bn_relu(32, 64), conv_bn_relu(64, 64), nn.MaxPool2d(2)),
            "stage3": nn.Sequential(conv_bn_relu(64, 128), nn.MaxPool2d(2)),
        })
        self.head = nn.Linear(128, num_classes)


def smallnet(num_classes: int, in_channels: int) -> SmallNet:
    return SmallNet(num_classes, in_channels)
