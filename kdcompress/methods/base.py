"""The interface every distillation method implements (one method = one file)."""

from __future__ import annotations

import torch
from torch import nn

from kdcompress.types import ModelOutput


class DistillLoss(nn.Module):
    """A knowledge-distillation objective.

    ``__init__`` takes only the method's hyper-parameters: exactly its ``methods.<name>`` keys in
    params.yaml, each with a default. ``forward(student_out, teacher_out, target)`` returns a
    per-sample loss ``[B]``; a method whose loss is only defined on a batch sets
    ``batch_level = True`` and returns that scalar broadcast to ``[B]``. Losses never call the
    student; modules they own (adapters, heads, memory banks, peers) are trained with it and are
    never exported.
    """

    needs_teacher: bool = True
    # True when the method back-propagates through the teacher or hooks its modules (data-free
    # generators): it then needs the PyTorch teacher, never the onnxruntime one.
    needs_teacher_grad: bool = False
    # False when the student does not train on the real samples (data-free), so a sample selector
    # such as SAKD has nothing to select.
    selects_samples: bool = True
    batch_level: bool = False
    # (ce_weight, kd_weight) used when distill.ce_weight / distill.kd_weight are null: Hinton's
    # 0.1 CE + 0.9 KD blend for logit methods; feature methods use CE + their own weighted term.
    default_weights: tuple[float, float] = (0.1, 0.9)

    def teacher_parts(self) -> frozenset[str] | None:
        """What ``forward`` reads of the frozen teacher's output: ``logits``, ``embedding`` or stage
        names (feature methods keep theirs in ``self.spots`` or ``self.spot``); None when the method
        has no frozen teacher to read (peers, a generator that back-propagates through it)."""
        if not self.needs_teacher or self.needs_teacher_grad:
            return None
        spots = self._spots()
        return frozenset(spots) if spots else frozenset({"logits"})

    def _spots(self) -> tuple[str, ...]:
        return getattr(self, "spots", None) or ((self.spot,) if getattr(self, "spot", None) else ())

    def spot_names(self) -> tuple[str, ...]:
        """The spots (stage names or ``embedding``) where this method's terms sit, one term each;
        empty for logit methods. Spot-adaptive routing (kdcompress.routing) gates each per sample."""
        return self._spots()

    def spot_loss(self, name: str, student_out: ModelOutput, teacher_out: ModelOutput,
                  target: torch.Tensor) -> torch.Tensor:
        """The term at spot ``name``, shaped like ``forward``'s loss; summed over ``spot_names()`` it
        is ``forward``'s loss. Methods with several spots override it (``PerSpotLoss`` sums it)."""
        return self(student_out, teacher_out, target)

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once by the Distiller: methods that own extra models (a peer student, an EMA
        copy, hooks on the teacher) build them here. Keep no reference to the teacher's grads."""

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        """Build shape-dependent modules (adapters, regressors) from one probe batch."""

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called by fit() before each epoch (0-based): schedules, warm-ups."""

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs the student trains on (data-free methods replace them)."""
        return x, y

    def teacher_forward(self, teacher: nn.Module | None, x: torch.Tensor) -> ModelOutput | None:
        """The knowledge source for this batch: by default the frozen teacher, without grad."""
        if teacher is None:
            return None
        with torch.no_grad():
            return teacher.extract(x)

    def after_step(self, student: nn.Module) -> None:
        """Called after each optimizer step (EMA updates and the like)."""


class PerSpotLoss(DistillLoss):
    """A method whose loss is a sum of one term per spot: it implements ``spot_loss``."""

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return sum(self.spot_loss(n, student_out, teacher_out, target) for n in self.spot_names())
