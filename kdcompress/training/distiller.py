"""The one place that runs the student (and the frozen teacher) and combines CE with KD."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.common import distributed
from kdcompress.types import ModelOutput, StepOutput

if TYPE_CHECKING:
    from kdcompress.data.loader import BatchLoader
    from kdcompress.methods.base import DistillLoss
    from kdcompress.training.routing import SpotRouter
    from kdcompress.training.teacher_cache import TeacherCache


class Distiller(nn.Module):
    """Student + frozen teacher + distillation loss.

    Per-sample loss: ``ce_weight * CE_i + kd_weight * KD_i`` (None: the loss's
    ``default_weights``). When the sample selector hands per-sample distillation strengths
    ``alpha`` (SAKD), it is ``2 * [(1 - alpha_i) * ce_weight * CE_i + alpha_i * kd_weight * KD_i]``,
    as in the SAKD authors' code: ``alpha = 0.5`` is exactly the base method, and batch-level
    losses use the batch mean of alpha for their KD term. ``alpha_scale = "constant"`` (SAKD's
    ``sakd.loss_scale``, set by its selector) multiplies that by ``constant_scale``, so that the
    batch's per-sample weights total those of the base method. With ``loss=None`` it is plain
    cross-entropy: the teacher's own training and the ``ce`` baseline. With a ``router``
    (spot-adaptive distillation, kdcompress.routing), KD_i is the sum of the method's per-spot terms
    that the router's policy gates for this sample.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, loss: DistillLoss | None = None,
                 ce_weight: float | None = None, kd_weight: float | None = None, label_smoothing: float = 0.0,
                 router: SpotRouter | None = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.loss = loss
        defaults = loss.default_weights if loss is not None else (1.0, 0.0)
        self.ce_weight = defaults[0] if ce_weight is None or loss is None else ce_weight
        self.kd_weight = defaults[1] if kd_weight is None else kd_weight
        self.label_smoothing = label_smoothing
        self.cache: TeacherCache | None = None  # stored teacher outputs, used when forward() gets the indices
        self.router = router  # trained by its own optimizer, never by fit()'s
        self.alpha_scale = "paper"  # paper | constant: the loss with per-sample alpha (see above)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        if loss is not None:
            loss.attach(student, teacher)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student + what the loss owns (adapters, heads, peers); never the teacher."""
        params = list(self.student.parameters())
        if self.loss is not None:
            params += [p for p in self.loss.parameters() if p.requires_grad]
        return params

    @torch.no_grad()
    def setup(self, x: torch.Tensor) -> None:
        """Let the loss build its shape-dependent modules from one probe batch."""
        if self.loss is None:
            return
        was_training = self.student.training
        self.student.eval()
        s, t = self.student.extract(x), self.loss.teacher_forward(self.teacher, x)
        self.loss.setup(s, t)
        if self.router is not None:
            self.router.setup(self.student, self.teacher, s, t)
        self.student.train(was_training)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if self.loss is not None:
            self.loss.on_epoch_start(epoch, epochs)
        if self.cache is not None:
            self.cache.begin_epoch(epoch)
        if self.router is not None:
            self.router.begin_epoch()

    def on_epoch_end(self) -> None:
        if self.cache is not None:
            self.cache.end_epoch()

    def epoch_metrics(self, val: BatchLoader) -> dict[str, float]:
        """Metrics of the epoch beyond the loop's own (spot routing rates, graft accuracy)."""
        return {} if self.router is None else self.router.epoch_metrics(self.student, self.teacher, val)

    def auxiliary_param_groups(self) -> list[dict]:
        """Parameter groups of optimizers other than fit()'s; fit() sets their ``lr`` to its own
        times their ``lr_scale``."""
        return [] if self.router is None else self.router.optimizer.param_groups

    def teacher_output(self, x: torch.Tensor, index: torch.Tensor | None):
        """The teacher's output on batch ``x`` (dataset indices ``index``): from the cache when it
        holds them, else from the loss's ``teacher_forward`` (and then stored)."""
        if self.cache is None or index is None:
            return self.loss.teacher_forward(self.teacher, x)
        out = self.cache.lookup(index)
        if out is None:
            out = self.loss.teacher_forward(self.teacher, x)
            self.cache.store(index, out)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> StepOutput:
        if self.loss is not None:
            x, y = self.loss.prepare_batch(x, y)
        s = self.student.extract(x)
        ce = F.cross_entropy(s.logits, y, reduction="none", label_smoothing=self.label_smoothing)
        if self.loss is None:
            per_sample = ce
        else:
            t = self.teacher_output(x, index)
            if self.router is not None:
                kd = self.router.distil(self.loss, self.student, self.teacher, s, t, y)
            elif self.loss.batch_level and distributed.world()[1] > 1:  # the loss of the global batch
                sizes = distributed.batch_sizes(len(y), y.device)
                kd = self.loss(gather_output(s, sizes), gather_output(t, sizes), distributed.gather(y, sizes))[:len(y)]
            else:
                kd = self.loss(s, t, y)
            if alpha is None:
                per_sample = self.ce_weight * ce + self.kd_weight * kd
            else:
                kd_alpha = alpha.mean() if self.loss.batch_level else alpha
                per_sample = 2 * ((1 - alpha) * self.ce_weight * ce + kd_alpha * self.kd_weight * kd)
                if self.alpha_scale == "constant":
                    per_sample = per_sample * constant_scale(alpha, self.ce_weight, self.kd_weight).to(per_sample.dtype)
        # a rank may hold no sample of the last global batch: its share of the loss is 0, not the NaN of an empty mean
        loss = per_sample.mean() if len(per_sample) else per_sample.sum()
        return StepOutput(loss=loss, logits=s.logits.detach(), per_sample=per_sample.detach(), target=y)

    def after_step(self) -> None:
        if self.loss is not None:
            self.loss.after_step(self.student)


def alpha_weights(alpha: torch.Tensor, ce_weight: float, kd_weight: float) -> torch.Tensor:
    """Each sample's weight of CE plus that of KD in the loss with per-sample ``alpha``:
    ``2 [(1 - alpha_i) ce_weight + alpha_i kd_weight]`` (the base method's is ``ce_weight + kd_weight``)."""
    return 2 * ((1 - alpha) * ce_weight + alpha * kd_weight)


def constant_scale(alpha: torch.Tensor, ce_weight: float, kd_weight: float) -> torch.Tensor:
    """The factor (a 0-d tensor) that makes the ``alpha_weights`` of the global batch (every rank's
    samples) total the base method's: exactly 1 when alpha is 0.5; when alpha falls with the logit
    methods' kd_weight > ce_weight, above 1, so weight moves from KD to CE without shrinking the step
    (the paper's loss would shrink, as a lower learning rate would). Computed in float64."""
    a = alpha.detach().double()
    sums = torch.stack([alpha_weights(a, ce_weight, kd_weight).sum(), a.new_tensor(len(a) * (ce_weight + kd_weight))])
    total, base = distributed.all_sum(sums)
    return torch.where(total > 0, base / total.clamp_min(1e-300), torch.ones_like(total))


def gather_output(out: ModelOutput, sizes: list[int]) -> ModelOutput:
    """A ``ModelOutput`` of the global batch (every rank's rows, gradients kept)."""
    return ModelOutput(logits=distributed.gather(out.logits, sizes),
                       features={k: distributed.gather(v, sizes) for k, v in out.features.items()},
                       embedding=None if out.embedding is None else distributed.gather(out.embedding, sizes))
