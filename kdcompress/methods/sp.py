"""Similarity-preserving KD: Tung & Mori, "Similarity-Preserving Knowledge Distillation",
ICCV 2019.

Batch-level: for each spot, ``G = normalize_rows(F F^T)`` with ``F`` the flattened ``[B, CHW]``
activations; loss ``weight * sum_spots ||G_s - G_t||_F^2 / B^2``. The Gram matrices are
``B x B`` whatever the channel or spatial sizes, so no adapters are needed. Defaults: the last
stage and weight (gamma) 3000, the paper's CIFAR setting and the CRD benchmark's ``-b 3000``.
Row normalisation makes it independent of feature sizes; the ``1 / B^2`` makes it depend on the
batch size (the paper used 128, our default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.methods._features import broadcast_batch, parse_spots, require_spots, spot_map
from kdcompress.methods._params import non_negative
from kdcompress.methods.base import PerSpotLoss
from kdcompress.types import ModelOutput


def similarity(f: torch.Tensor) -> torch.Tensor:
    f = f.flatten(1)
    return F.normalize(f @ f.t(), dim=1)


class SP(PerSpotLoss):
    method = "sp"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)
    batch_level = True

    def __init__(self, spots: str = "stage3", weight: float = 3000.0):
        super().__init__()
        self.spots = parse_spots(self.method, spots)
        self.weight = non_negative(self.method, "weight", weight)

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        require_spots(self.method, self.spots, student_out, teacher_out)

    def spot_loss(self, name: str, student_out: ModelOutput, teacher_out: ModelOutput,
                  target: torch.Tensor) -> torch.Tensor:
        b = student_out.logits.shape[0]
        g_s = similarity(spot_map(student_out, name, self.method))
        g_t = similarity(spot_map(teacher_out, name, self.method))
        return broadcast_batch(self.weight * (g_s - g_t).pow(2).sum() / b**2, b)
