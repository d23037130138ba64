"""Online self-distillation from an exponential moving average of the student: the "mean
teacher" of Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged
consistency targets improve semi-supervised deep learning results", NeurIPS 2017.

Teacher-free: the loss owns an EMA copy of the student (made in ``attach()``, never trained by
gradient, always in eval mode); after every optimizer step ``ema = a * ema + (1 - a) * student``
for parameters and floating buffers (BN statistics), with the paper's ramp
``a = min(decay, 1 - 1 / (step + 1))`` so the average is not dominated by the random
initialisation early on. Per sample ``T^2 KL(p_ema || p_student)``, the EMA output without
gradient. Defaults: decay 0.999 (the paper's later-phase value) and T = 1 (the paper matches
softmax outputs at T = 1; it uses an MSE consistency cost, we use the KL of the rest of the zoo).
As the EMA only knows what the student learnt from labels, use a sizeable distill.ce_weight.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kdcompress.methods._params import check_param
from kdcompress.methods.base import DistillLoss
from kdcompress.methods.kd import kl_per_sample
from kdcompress.methods.schedule import TemperatureScheduled
from kdcompress.types import ModelOutput


class OnlineEMA(TemperatureScheduled, DistillLoss):
    method = "online_ema"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)
    needs_teacher = False

    def __init__(self, decay: float = 0.999, temperature: float = 1.0, t_schedule: str = "constant",
                 t_end: float = 1.0):
        super().__init__()
        self.decay = check_param(self.method, "decay", decay, lo=0.0, hi=1.0)
        self.init_temperature(temperature, t_schedule, t_end)
        self.ema: nn.Module | None = None
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.ema = copy.deepcopy(student)
        self.ema.requires_grad_(False)
        self.ema.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ema is not None:
            self.ema.eval()  # the EMA model always runs on its averaged BN statistics
        return self

    def teacher_forward(self, teacher: nn.Module | None, x: torch.Tensor) -> ModelOutput:
        with torch.no_grad():
            return self.ema.extract(x)

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        a = min(self.decay, 1.0 - 1.0 / (int(self.steps) + 1))
        ema_state = self.ema.state_dict()
        for name, value in student.state_dict().items():
            target = ema_state[name]
            if target.dtype.is_floating_point:
                target.mul_(a).add_(value.detach(), alpha=1.0 - a)
            else:
                target.copy_(value)
        self.steps += 1

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return kl_per_sample(student_out.logits, teacher_out.logits, self.temperature)
