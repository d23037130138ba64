"""Attention transfer: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017.

The spatial attention map of a feature map is ``a = mean_c |f_c|^p`` (p = 2), flattened and
L2-normalised; per sample ``weight * sum_spots mean_{hw} (a_s - a_t)^2``. Channel counts may
differ (the map is channel-pooled); where spatial sizes differ the larger attention map is
average-pooled to the smaller one before normalising. Defaults: p = 2, weight (the paper's beta)
1000 over several spots, as in the authors' code and the CRD benchmark (``-b 1000``). The mean
over positions is the authors' own normalisation, so smaller maps need no rescaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.methods._features import match_spatial, parse_spots, require_spots, spot_map
from kdcompress.methods._params import non_negative, positive
from kdcompress.methods.base import PerSpotLoss
from kdcompress.types import ModelOutput


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """``[B, C, H, W] -> [B, 1, H, W]``: mean over channels of ``|f|^p``."""
    return f.abs().pow(p).mean(1, keepdim=True)


class AT(PerSpotLoss):
    method = "at"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)

    def __init__(self, spots: str = "stage1,stage2,stage3", p: float = 2.0, weight: float = 1000.0):
        super().__init__()
        self.spots = parse_spots(self.method, spots, maps=True)
        self.p = positive(self.method, "p", p)
        self.weight = non_negative(self.method, "weight", weight)

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        require_spots(self.method, self.spots, student_out, teacher_out)

    def spot_loss(self, name: str, student_out: ModelOutput, teacher_out: ModelOutput,
                  target: torch.Tensor) -> torch.Tensor:
        a_s = attention_map(spot_map(student_out, name, self.method), self.p)
        a_t = attention_map(spot_map(teacher_out, name, self.method), self.p)
        a_s, a_t = match_spatial(a_s, a_t)
        a_s, a_t = F.normalize(a_s.flatten(1), dim=1), F.normalize(a_t.flatten(1), dim=1)
        return self.weight * (a_s - a_t).pow(2).mean(1)
