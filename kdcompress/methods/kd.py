"""Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS DL workshop 2015.

Per-sample ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``; the T^2 keeps gradient magnitudes
comparable across temperatures. T = 4 is the CIFAR recipe of Tian et al. (CRD, ICLR 2020), whose
``-r 0.1 -a 0.9`` matches our distill.ce_weight / kd_weight defaults. ``t_schedule`` / ``t_end``
anneal T over the epochs (see ``kdcompress.losses.schedule``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.methods.base import DistillLoss
from kdcompress.methods.schedule import TemperatureScheduled
from kdcompress.types import ModelOutput


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` at temperature T, one value per row."""
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(1) * temperature**2


class KD(TemperatureScheduled, DistillLoss):
    method = "kd"

    def __init__(self, temperature: float = 4.0, t_schedule: str = "constant", t_end: float = 1.0):
        super().__init__()
        self.init_temperature(temperature, t_schedule, t_end)

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return kl_per_sample(student_out.logits, teacher_out.logits, self.temperature)
