"""TinyCNN: a three-conv network for micro-controller-class budgets (about 20x fewer
multiply-accumulates than ResNet-20). Plain conv-BN-ReLU blocks that onnxruntime fuses.

The widths are a knob: ``tinycnn`` is 16/32/64 channels, ``tinycnn:16-48-96`` any three."""

from __future__ import annotations

from torch import nn

from models.base import Classifier, conv_bn_relu

DEFAULT_WIDTHS = (16, 32, 64)


class TinyCNN(Classifier):
    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, int, int] = DEFAULT_WIDTHS):
        super().__init__()
        c1, c2, c3 = widths
        self.stem = nn.Identity()
        self.stages = nn.ModuleDict({
            "stage1": nn.Sequential(conv_bn_relu(in_channels, c1), nn.MaxPool2d(2)),
            "stage2": nn.Sequential(conv_bn_relu(c1, c2), nn.MaxPool2d(2)),
            "stage3": conv_bn_relu(c2, c3),
        })
        self.head = nn.Linear(c3, num_classes)


def tinycnn(num_classes: int, in_channels: int, widths: str = "") -> TinyCNN:
    """``widths``: "" for the default, else three channel counts joined by '-' (``16-48-96``; not commas,
    which `dvc exp run -S` reads as a sweep)."""
    if not widths:
        return TinyCNN(num_classes, in_channels)
    try:
        parsed = tuple(int(w) for w in widths.split("-"))
    except ValueError:
        parsed = ()
    if len(parsed) != 3 or min(parsed) < 1:
        raise ValueError(f"tinycnn:{widths}: expected three positive channel counts, e.g. tinycnn:16-48-96")
    return TinyCNN(num_classes, in_channels, parsed)
