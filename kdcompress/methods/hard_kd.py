"""Hard-label distillation: cross-entropy on the teacher's argmax prediction, as in Touvron et
al., "Training data-efficient image transformers & distillation through attention" (DeiT),
ICML 2021, section 5 ("hard-label distillation").

Per sample: ``teacher_weight * CE(z_s, argmax z_t) + (1 - teacher_weight) * CE(z_s, y)``.
DeiT weighs the two halves equally (``teacher_weight = 0.5``). Note that the Distiller adds
``ce_weight * CE(z_s, y)`` on top and scales this term by ``kd_weight``: with the default
distill weights (0.1 / 0.9) the total label : teacher split is 0.55 : 0.45, close to DeiT's
1/2 : 1/2; set ``teacher_weight: 1.0`` to leave the blend to the distill weights alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.methods._params import check_param
from kdcompress.methods.base import DistillLoss
from kdcompress.types import ModelOutput


class HardKD(DistillLoss):
    method = "hard_kd"

    def __init__(self, teacher_weight: float = 0.5):
        super().__init__()
        self.teacher_weight = check_param(self.method, "teacher_weight", teacher_weight, lo=0.0, hi=1.0)

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(student_out.logits, teacher_out.logits.argmax(1), reduction="none")
        if self.teacher_weight == 1.0:
            return loss
        label = F.cross_entropy(student_out.logits, target, reduction="none")
        return self.teacher_weight * loss + (1.0 - self.teacher_weight) * label
