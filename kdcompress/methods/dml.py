"""Deep mutual learning: Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018.

Teacher-free: two students learn together. The loss owns the second student (the peer): a deep
copy of the student made in ``attach()`` and re-initialised (``reset_parameters()`` on every
layer that has one: an independent start, as in the paper; a model's custom initialisation
scheme is not reproduced). ``teacher_forward`` returns the peer's output WITH gradient. Per
sample (the Distiller adds the student's own CE):

``T^2 KL(p_peer || p_student)``  (student learns from the peer; the peer's side detached)
``+ CE(peer, y) + T^2 KL(p_student || p_peer)``  (the peer's own DML objective; student detached)

so one backward pass trains both (the paper's synchronous variant); the peer's parameters are the
loss's, so the optimizer steps them. T = 1 as in the paper. The exported model is the first
student; the peer is dropped. Note the peer's terms are scaled by distill.kd_weight like any KD
term: with ce_weight = kd_weight = 1 the student and the peer get exactly the paper's
``CE + KL`` objective.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.methods.base import DistillLoss
from kdcompress.methods.kd import kl_per_sample
from kdcompress.methods.schedule import TemperatureScheduled
from kdcompress.types import ModelOutput


def reinitialised_copy(model: nn.Module) -> nn.Module:
    peer = copy.deepcopy(model)
    for module in peer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return peer


class DML(TemperatureScheduled, DistillLoss):
    method = "dml"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)
    needs_teacher = False

    def __init__(self, temperature: float = 1.0, t_schedule: str = "constant", t_end: float = 1.0):
        super().__init__()
        self.init_temperature(temperature, t_schedule, t_end)
        self.peer: nn.Module | None = None

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.peer = reinitialised_copy(student)

    def teacher_forward(self, teacher: nn.Module | None, x: torch.Tensor) -> ModelOutput:
        return self.peer.extract(x)

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        s, p = student_out.logits, teacher_out.logits
        student_term = kl_per_sample(s, p.detach(), self.temperature)
        peer_term = F.cross_entropy(p, target, reduction="none") + kl_per_sample(p, s.detach(), self.temperature)
        return student_term + peer_term
