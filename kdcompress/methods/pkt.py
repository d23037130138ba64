"""Probabilistic knowledge transfer: Passalis & Tefas, "Learning Deep Representations with
Probabilistic Knowledge Transfer", ECCV 2018.

Batch-level: the cosine-similarity kernel ``K_ij = (cos(f_i, f_j) + 1) / 2`` of the embeddings is
turned into conditional probabilities ``P_{j|i} = K_ij / sum_j K_ij`` for teacher and student;
loss ``weight * mean_{ij} P^t_{j|i} log((P^t_{j|i} + eps) / (P^s_{j|i} + eps))`` (the authors'
code, averaged over all B^2 entries). Embedding widths may differ (kernels are B x B). Default
weight 30000 is the CRD benchmark's (batch 64); the mean over B^2 entries makes the term shrink
roughly as 1/B, so at our batch 128 it is about half as strong: raise ``weight`` if you want the
benchmark's strength.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.methods._features import EMBEDDING, broadcast_batch, parse_spots, require_spots, spot_vector
from kdcompress.methods._params import non_negative
from kdcompress.methods.base import DistillLoss
from kdcompress.types import ModelOutput

EPS = 1e-7


def conditional_probabilities(f: torch.Tensor) -> torch.Tensor:
    f = F.normalize(f, dim=1, eps=EPS)
    k = (f @ f.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


class PKT(DistillLoss):
    method = "pkt"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)
    batch_level = True

    def __init__(self, spot: str = EMBEDDING, weight: float = 30000.0):
        super().__init__()
        self.spot = parse_spots(self.method, spot, "spot", single=True)[0]
        self.weight = non_negative(self.method, "weight", weight)

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        require_spots(self.method, (self.spot,), student_out, teacher_out, key="spot")

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        p_s = conditional_probabilities(spot_vector(student_out, self.spot, self.method, "spot"))
        p_t = conditional_probabilities(spot_vector(teacher_out, self.spot, self.method, "spot"))
        loss = (p_t * ((p_t + EPS) / (p_s + EPS)).log()).mean()
        return broadcast_batch(self.weight * loss, p_s.shape[0])
