"""Neuron selectivity transfer: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
Selectivity Transfer", arXiv 1707.01219, 2017.

Each channel's spatial activation pattern (flattened, L2-normalised) is one sample of a
distribution; NST matches the student's and teacher's distributions with the squared MMD under the
polynomial kernel ``k(x, y) = (x . y)^2`` (d = 2, c = 0, the paper's best):
per sample ``weight * sum_spots [mean k(t, t') + mean k(s, s') - 2 mean k(s, t)]`` over channel
pairs. Channel counts may differ (the MMD compares sets); the larger map is average-pooled to the
smaller so the patterns have the same length. Weight 50 and the three stage spots are the CRD
benchmark's (``-b 50``); the kernel of unit vectors is size-free, so no rescaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.methods._features import match_spatial, parse_spots, require_spots, spot_map
from kdcompress.methods._params import non_negative
from kdcompress.methods.base import PerSpotLoss
from kdcompress.types import ModelOutput


def poly_mmd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample squared MMD between the channel patterns of ``s`` and ``t`` ([B, C, H, W])."""
    s = F.normalize(s.flatten(2), dim=2)
    t = F.normalize(t.flatten(2), dim=2)

    def k(a, b):
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean(dim=(1, 2))

    return k(t, t) + k(s, s) - 2 * k(s, t)


class NST(PerSpotLoss):
    method = "nst"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)

    def __init__(self, spots: str = "stage1,stage2,stage3", weight: float = 50.0):
        super().__init__()
        self.spots = parse_spots(self.method, spots, maps=True)
        self.weight = non_negative(self.method, "weight", weight)

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        require_spots(self.method, self.spots, student_out, teacher_out)

    def spot_loss(self, name: str, student_out: ModelOutput, teacher_out: ModelOutput,
                  target: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(spot_map(student_out, name, self.method), spot_map(teacher_out, name, self.method))
        return self.weight * poly_mmd(s, t)
