"""Architectures only (code, not weights). ``create_model(name, num_classes, in_channels)``.

A name is a registry key, optionally with an argument after a colon that the builder reads
(``tinycnn:16-48-96``: TinyCNN with those stage widths; ``mobilenet:16``: a MobileNet half as wide;
``tv:resnet18``: a torchvision model; ``timm:resnet10t``: a timm model)."""

from __future__ import annotations

from collections.abc import Callable

from models.base import Classifier
from models.mobilenet import mobilenet
from models.resnet import resnet20, resnet32, resnet56
from models.smallnet import smallnet
from models.timm_net import timm_model
from models.tinycnn import tinycnn
from models.tv import torchvision_model

MODELS: dict[str, Callable[..., Classifier]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "smallnet": smallnet,
    "mobilenet": mobilenet,
    "tinycnn": tinycnn,
    "tv": torchvision_model,
    "timm": timm_model,
}
TAKES_ARGUMENT = {"tinycnn", "mobilenet", "tv", "timm"}  # builders that read the part after "name:"


def create_model(name: str, num_classes: int, in_channels: int) -> Classifier:
    key, _, argument = name.partition(":")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))} "
                         "(widths: tinycnn:C1-C2-C3, mobilenet:W; torchvision: tv:<name>; timm: timm:<name>)")
    if argument and key not in TAKES_ARGUMENT:
        raise ValueError(f"model {key!r} takes no argument after ':'; got {name!r}")
    model = MODELS[key](num_classes, in_channels, argument) if argument else MODELS[key](num_classes, in_channels)
    model.arch = name  # the registry name, recorded in checkpoints and ONNX metadata
    model.num_classes = num_classes  # finds the classifier head (kdcompress.common.checkpoint.classifier_keys)
    return model
