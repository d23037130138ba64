"""Logit regression ("mimic learning"): Ba & Caruana, "Do Deep Nets Really Need to be Deep?",
NIPS 2014: the student regresses the teacher's pre-softmax logits with an L2 loss.

Per sample: ``mean_c (z_s[c] - z_t[c])^2`` (mean over classes). No hyper-parameters: scale it with
distill.kd_weight. It is KD's high-temperature limit, so it takes no temperature schedule.
"""

from __future__ import annotations

import torch

from kdcompress.methods.base import DistillLoss
from kdcompress.types import ModelOutput


class LogitL2(DistillLoss):
    method = "logit_l2"

    def __init__(self):
        super().__init__()

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return (student_out.logits - teacher_out.logits).pow(2).mean(1)
