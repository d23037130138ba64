"""FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

The student's "guided" layer, through a learned regressor, regresses the teacher's "hint" layer:
per sample ``weight * mean_{c,h,w} (r(f_s) - f_t)^2`` summed over the spots. The regressor
(always present, as in the paper; built in ``setup()``) is the CRD benchmark's: a 1x1
convolution from the student's to the teacher's channels, BatchNorm and ReLU (the teacher's
stage outputs are post-ReLU). The weight 100 was tuned with that BatchNorm: without it, a plain
1x1 regressor diverged to NaN at our learning rate (0.2, batch 128) against a trained ResNet-20.
The larger map is average-pooled to the smaller one first (the cheap order). The paper trains the hint stage first; we
train it jointly with the task loss, as the CRD benchmark does (Tian et al., ICLR 2020: one
middle hint layer, weight 100, ``-a 0 -b 100``). The mean over elements keeps the term
independent of our smaller map sizes, so the weight needs no rescaling.
"""

from __future__ import annotations

import torch
from torch import nn

from kdcompress.methods._features import conv1x1, match_spatial, parse_spots, per_sample_mean, spot_map
from kdcompress.methods._params import non_negative
from kdcompress.methods.base import PerSpotLoss
from kdcompress.types import ModelOutput


class FitNet(PerSpotLoss):
    method = "fitnet"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)

    def __init__(self, spots: str = "stage2", weight: float = 100.0):
        super().__init__()
        self.spots = parse_spots(self.method, spots)
        self.weight = non_negative(self.method, "weight", weight)
        self.regressors = nn.ModuleDict()

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        for name in self.spots:
            s, t = spot_map(student_out, name, self.method), spot_map(teacher_out, name, self.method)
            if name not in self.regressors:
                self.regressors[name] = nn.Sequential(
                    conv1x1(s.shape[1], t.shape[1], s), nn.BatchNorm2d(t.shape[1]).to(s.device, s.dtype), nn.ReLU())

    def spot_loss(self, name: str, student_out: ModelOutput, teacher_out: ModelOutput,
                  target: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(spot_map(student_out, name, self.method), spot_map(teacher_out, name, self.method))
        return self.weight * per_sample_mean((self.regressors[name](s) - t).pow(2))
