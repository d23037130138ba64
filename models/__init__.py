"""Architectures only (code, not weights). ``create_model(name, num_classes, in_channels)``."""

from __future__ import annotations

from collections.abc import Callable

from models.base import Classifier
from models.mobilenet import mobilenet
from models.resnet import resnet20, resnet32, resnet56
from models.smallnet import smallnet
from models.tinycnn import tinycnn

MODELS: dict[str, Callable[[int, int], Classifier]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "smallnet": smallnet,
    "mobilenet": mobilenet,
    "tinycnn": tinycnn,
}


def create_model(name: str, num_classes: int, in_channels: int) -> Classifier:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    model = MODELS[name](num_classes, in_channels)
    model.arch = name  # the registry name, recorded in checkpoints and ONNX metadata
    return model
