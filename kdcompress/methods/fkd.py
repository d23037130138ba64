"""Focal knowledge distillation: the per-sample KD term of Hinton et al. (2015) re-weighted by the
focal factor of Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.

Per sample ``i``: ``(1 - p_i)^gamma * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` where
``p_i = softmax(z_s)[y_i]`` is the STUDENT's probability of the sample's ground-truth label at
temperature 1 (its real confidence), detached: the factor only re-weights samples (hard samples,
where the student is still unsure of the label, get more distillation) and sends no gradient of
its own. ``gamma = 0`` is plain KD. Defaults: T = 4 as for KD, and focal loss's gamma = 2. (A per-class variant,
weighting each class by ``(1 - p_s^T[c])^gamma``, is not this method.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.methods._params import non_negative
from kdcompress.methods.base import DistillLoss
from kdcompress.methods.kd import kl_per_sample
from kdcompress.methods.schedule import TemperatureScheduled
from kdcompress.types import ModelOutput


class FocalKD(TemperatureScheduled, DistillLoss):
    method = "fkd"

    def __init__(self, temperature: float = 4.0, gamma: float = 2.0, t_schedule: str = "constant", t_end: float = 1.0):
        super().__init__()
        self.init_temperature(temperature, t_schedule, t_end)
        self.gamma = non_negative(self.method, "gamma", gamma)

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        p_target = F.softmax(student_out.logits.detach(), dim=1).gather(1, target[:, None]).squeeze(1)
        focal = (1.0 - p_target).clamp_min(0.0).pow(self.gamma)
        return focal * kl_per_sample(student_out.logits, teacher_out.logits, self.temperature)
