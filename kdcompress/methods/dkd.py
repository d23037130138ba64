"""Decoupled knowledge distillation: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge
Distillation", CVPR 2022.

KD's KL splits into a target-class term and a non-target-class term, which DKD re-weights:

* TCKD = ``T^2 * KL(b_t || b_s)`` with the binary distributions ``b = [p_y, 1 - p_y]``;
* NCKD = ``T^2 * KL(p^_t || p^_s)`` with ``p^`` the softmax over the non-target classes only;
* loss = ``w(epoch) * (alpha * TCKD + beta * NCKD)``, ``w = min((epoch + 1) / warmup, 1)``.

Defaults are the paper's CIFAR recipe: alpha = 1, beta = 8, T = 4. The paper warms up over 20 of
240 epochs (8 %); our default run is 10 epochs, where 8 % is under one epoch, so ``warmup`` defaults
to 1 (no ramp; set 20 for a 240-epoch recipe). Epochs count from 1 in the ramp, as in the authors'
code, so the first epoch is never KD-free. Computed with log-sum-exp (no ``log(0)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.methods._params import check_param, non_negative
from kdcompress.methods.base import DistillLoss
from kdcompress.methods.schedule import TemperatureScheduled, warmup_factor
from kdcompress.types import ModelOutput


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD, NCKD), each already multiplied by ``T^2``."""
    gt = F.one_hot(target, student_logits.shape[1]).bool()

    def log_parts(logits):
        z = logits / temperature
        lse_all = torch.logsumexp(z, dim=1)
        lse_non = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1)
        log_b = torch.stack([z[gt] - lse_all, lse_non - lse_all], dim=1)  # log [p_y, 1 - p_y]
        log_nt = (z - lse_non[:, None]).masked_fill(gt, 0.0)  # log softmax over non-targets
        return log_b, log_nt

    log_b_s, log_nt_s = log_parts(student_logits)
    log_b_t, log_nt_t = log_parts(teacher_logits)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(1)
    nckd = (log_nt_t.exp() * (log_nt_t - log_nt_s)).masked_fill(gt, 0.0).sum(1)
    return tckd * temperature**2, nckd * temperature**2


class DKD(TemperatureScheduled, DistillLoss):
    method = "dkd"
    default_weights = (1.0, 1.0)  # the paper's recipe: CE + DKD (alpha and beta weight the terms)

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 1,
                 t_schedule: str = "constant", t_end: float = 1.0):
        super().__init__()
        self.alpha = non_negative(self.method, "alpha", alpha)
        self.beta = non_negative(self.method, "beta", beta)
        self.warmup = check_param(self.method, "warmup", warmup, lo=0)
        self.init_temperature(temperature, t_schedule, t_end)
        self.warm = warmup_factor(0, self.warmup)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self.warm = warmup_factor(epoch, self.warmup)

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        tckd, nckd = dkd_terms(student_out.logits, teacher_out.logits, target, self.temperature)
        return self.warm * (self.alpha * tckd + self.beta * nckd)
