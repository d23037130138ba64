"""Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS DL workshop 2015.

Per-sample ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``; the T^2 keeps gradient magnitudes
comparable across temperatures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.losses.base import DistillLoss
from kdcompress.types import ModelOutput


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` at temperature T, one value per row."""
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(1) * temperature**2


class KD(DistillLoss):
    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return kl_per_sample(student_out.logits, teacher_out.logits, self.temperature)
