"""The baseline selector: every training sample, every epoch, fixed weights."""

from __future__ import annotations

import torch

from kdcompress.training.selection.base import SampleSelector


class FullData(SampleSelector):
    def __init__(self, num_samples: int):
        self.num_samples = num_samples
        self.history = []

    def select(self, epoch: int) -> torch.Tensor:
        return torch.arange(self.num_samples)
