"""Common base of every architecture: ``extract`` gives logits + named features, ``forward``
gives logits only, so an exported ONNX graph has exactly one output."""

from __future__ import annotations

import torch
from torch import nn

from kdcompress.types import ModelOutput


class Classifier(nn.Module):
    """Subclasses build ``self.stages`` (an ordered ModuleDict of spatial blocks, shallow -> deep)
    and ``self.head`` (a Linear on the pooled last stage). ``stem`` is optional."""

    stem: nn.Module
    stages: nn.ModuleDict
    head: nn.Linear

    def extract(self, x: torch.Tensor) -> ModelOutput:
        x = self.stem(x)
        features = {}
        for name, stage in self.stages.items():
            x = stage(x)
            features[name] = x
        embedding = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return ModelOutput(logits=self.head(embedding), features=features, embedding=embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract(x).logits


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
