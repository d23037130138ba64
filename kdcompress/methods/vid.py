"""Variational information distillation: Ahn et al., "Variational Information Distillation for
Knowledge Transfer", CVPR 2019.

Maximises a variational lower bound of the mutual information between teacher and student
features: the teacher map is modelled as a Gaussian whose mean ``mu(f_s)`` is regressed from the
student map (1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv, hidden width = teacher channels)
and whose per-channel variance ``sigma_c^2 = softplus(a_c) + eps`` is learned (initialised at
``init_var``). Per sample ``weight * sum_spots mean_{c,h,w} [ (t - mu)^2 / (2 sigma_c^2) +
log(sigma_c^2) / 2 ]`` (the negative log-likelihood up to a constant; it can be negative).
The larger map is average-pooled to the smaller one first. Defaults as in the CRD benchmark's
reimplementation (three spots, weight 1, init_var 5, eps 1e-5); the mean over elements keeps the
weight independent of our map sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.methods._features import conv1x1, match_spatial, parse_spots, per_sample_mean, spot_map
from kdcompress.methods._params import check_param, non_negative, positive
from kdcompress.methods.base import PerSpotLoss
from kdcompress.types import ModelOutput


class _VariationalHead(nn.Module):
    def __init__(self, c_s: int, c_t: int, init_var: float, eps: float, like: torch.Tensor):
        super().__init__()
        self.mean = nn.Sequential(conv1x1(c_s, c_t, like), nn.ReLU(), conv1x1(c_t, c_t, like), nn.ReLU(),
                                  conv1x1(c_t, c_t, like))
        inv_softplus = math.log(math.expm1(init_var - eps))
        self.raw_var = nn.Parameter(torch.full((c_t,), inv_softplus, device=like.device, dtype=like.dtype))
        self.eps = eps

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        var = (F.softplus(self.raw_var) + self.eps)[None, :, None, None]
        return per_sample_mean(0.5 * ((self.mean(s) - t).pow(2) / var + var.log()))


class VID(PerSpotLoss):
    method = "vid"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)

    def __init__(self, spots: str = "stage1,stage2,stage3", weight: float = 1.0, init_var: float = 5.0,
                 eps: float = 1e-5):
        super().__init__()
        self.spots = parse_spots(self.method, spots)
        self.weight = non_negative(self.method, "weight", weight)
        self.eps = positive(self.method, "eps", eps)
        self.init_var = check_param(self.method, "init_var", init_var, lo=self.eps, lo_open=True)
        self.heads = nn.ModuleDict()

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        for name in self.spots:
            s, t = spot_map(student_out, name, self.method), spot_map(teacher_out, name, self.method)
            if name not in self.heads:
                self.heads[name] = _VariationalHead(s.shape[1], t.shape[1], self.init_var, self.eps, s)

    def spot_loss(self, name: str, student_out: ModelOutput, teacher_out: ModelOutput,
                  target: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(spot_map(student_out, name, self.method), spot_map(teacher_out, name, self.method))
        return self.weight * self.heads[name](s, t)
