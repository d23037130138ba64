"""Relational knowledge distillation: Park, Kim, Lu, Cho, "Relational Knowledge Distillation",
CVPR 2019.

Batch-level, on the embeddings: the distance-wise term matches pairwise Euclidean distances, each
divided by its batch's mean non-zero distance; the angle-wise term matches the cosines of the
angles formed by every triplet; both with the Huber (smooth L1) loss, averaged over pairs /
triplets. Loss ``distance_weight * L_D + angle_weight * L_A``. Defaults 25 / 50 are the CRD
benchmark's (Tian et al., ICLR 2020) CIFAR setting of the paper's RKD-DA; both terms are scale-
invariant (distances normalised, angles are cosines), so our embedding widths need no rescaling.
Batches of fewer than 2 (distance) or 3 (angle) samples contribute 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.methods._features import EMBEDDING, broadcast_batch, parse_spots, require_spots, spot_vector
from kdcompress.methods._params import non_negative
from kdcompress.methods.base import DistillLoss
from kdcompress.types import ModelOutput


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp_min(eps)
    off_diagonal = 1.0 - torch.eye(len(e), device=e.device, dtype=e.dtype)
    return d2.sqrt() * off_diagonal


def normalised_distances(e: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(e)
    return d / d[d > 0].mean().clamp_min(1e-12)


def triplet_cosines(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [B, B, D]: unit vectors e_j - e_i
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


class RKD(DistillLoss):
    method = "rkd"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)
    batch_level = True

    def __init__(self, spot: str = EMBEDDING, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.spot = parse_spots(self.method, spot, "spot", single=True)[0]
        self.distance_weight = non_negative(self.method, "distance_weight", distance_weight)
        self.angle_weight = non_negative(self.method, "angle_weight", angle_weight)

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        require_spots(self.method, (self.spot,), student_out, teacher_out, key="spot")

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        e_s = spot_vector(student_out, self.spot, self.method, "spot")
        e_t = spot_vector(teacher_out, self.spot, self.method, "spot").detach()
        b = e_s.shape[0]
        loss = e_s.new_zeros(())
        if b >= 2 and self.distance_weight:
            loss = loss + self.distance_weight * F.smooth_l1_loss(normalised_distances(e_s), normalised_distances(e_t))
        if b >= 3 and self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(triplet_cosines(e_s), triplet_cosines(e_t))
        return broadcast_batch(loss, b)
