"""CIFAR-style ResNets (He et al., "Deep Residual Learning", CVPR 2016, section 4.2):
a 3x3 stem and three stages of basic blocks at widths w, 2w, 4w; depth = 6n + 2."""

from __future__ import annotations

from torch import nn

from models.base import Classifier, conv_bn_relu


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(Classifier):
    def __init__(self, depth: int, num_classes: int, in_channels: int, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = conv_bn_relu(in_channels, width)
        stages, cin = {}, width
        for i, (cout, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2)], start=1):
            blocks = [BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1) for b in range(n)]
            stages[f"stage{i}"] = nn.Sequential(*blocks)
            cin = cout
        self.stages = nn.ModuleDict(stages)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for block in self.modules():  # zero-init the last BN of each residual branch
            if isinstance(block, BasicBlock):
                nn.init.zeros_(block.bn2.weight)


def resnet20(num_classes: int, in_channels: int) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int, in_channels: int) -> CifarResNet:
    return CifarResNet(32, num_classes, in_channels)


def resnet56(num_classes: int, in_channels: int) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)
