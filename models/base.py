"""Common base of every architecture: ``extract`` gives logits + named features, ``forward``
gives logits only, so an exported ONNX graph has exactly one output."""

from __future__ import annotations

import torch
from torch import nn

from kdcompress.types import ModelOutput

EMBEDDING, LOGITS = "embedding", "logits"


class Classifier(nn.Module):
    """Subclasses build ``self.stages`` (an ordered ModuleDict of spatial blocks, shallow -> deep)
    and ``self.head`` (a Linear on the pooled last stage). ``stem`` is optional.

    The forward pass is a chain of named boundaries: every stage, then ``embedding`` (the global
    average pool of the last stage), then ``logits``. ``run(x, start, stop)`` continues it from the
    output at boundary ``start`` (None: the input image) up to boundary ``stop``, which is what
    spot-adaptive distillation needs to graft teacher and student stages (kdcompress.training.routing)."""

    stem: nn.Module
    stages: nn.ModuleDict
    head: nn.Linear

    def boundaries(self) -> list[str]:
        return [*self.stages, EMBEDDING, LOGITS]

    def step(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The part of the forward pass that ends at boundary ``name``, applied to ``x``."""
        if name == EMBEDDING:
            return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        if name == LOGITS:
            return self.head(x)
        if name == next(iter(self.stages)):
            x = self.stem(x)
        return self.stages[name](x)

    def run(self, x: torch.Tensor, start: str | None, stop: str) -> torch.Tensor:
        names = self.boundaries()
        first = 0 if start is None else names.index(start) + 1
        for name in names[first:names.index(stop) + 1]:
            x = self.step(name, x)
        return x

    def extract(self, x: torch.Tensor) -> ModelOutput:
        out = {}
        for name in self.boundaries():
            x = out[name] = self.step(name, x)
        logits, embedding = out.pop(LOGITS), out.pop(EMBEDDING)
        return ModelOutput(logits=logits, features=out, embedding=embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract(x).logits


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
