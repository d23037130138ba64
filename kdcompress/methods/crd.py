"""Contrastive representation distillation: Tian, Krishnan, Isola, "Contrastive Representation
Distillation", ICLR 2020.

Student and teacher embeddings go through learned linear heads to ``feat_dim`` (128) and are
L2-normalised (the paper's ``g_S``, ``g_T``). For sample i the positive pair is (student_i,
teacher_i); negatives are other samples' embeddings of the other network. Per sample, the
symmetric InfoNCE loss at temperature ``tau``: student anchor vs teacher keys plus teacher anchor
vs student keys, as CRD contrasts in both directions (the teacher term trains the teacher head).

Negatives, by ``mode``:

* ``queue`` (default): the current batch plus a FIFO queue of the last ``negatives`` detached
  embeddings of each network from earlier batches (a MoCo-style memory: He et al., CVPR 2020).
  It needs nothing but the batch, so it is honest in this interface; the queue should be smaller
  than the training split, or a sample's own past embedding can serve as its negative.
* ``batch``: in-batch negatives only (the lightweight InfoNCE variant), ``negatives``
  unused.

Differences from the paper: the paper keeps an index-keyed memory bank of every training sample
(momentum 0.5) and draws 16384 negatives per anchor with an NCE objective. That bank needs each
sample's dataset index inside the loss, which ``forward(student_out, teacher_out, target)`` does
not receive; it is not faked here. Defaults: feat_dim 128,
tau 0.07 and weight 0.8 from the paper's CIFAR-100 recipe (``-b 0.8``; the Knowledge-
Distillation-Zoo reimplementation uses 0.2 on 10-class CIFAR-10), 4096 queued negatives (our
splits are ~54k; 16384 would hold stale embeddings from a third of an epoch back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcompress.common import distributed
from kdcompress.methods._features import EMBEDDING, linear, parse_spots, spot_vector
from kdcompress.methods._params import check_param, non_negative, positive
from kdcompress.methods.base import DistillLoss
from kdcompress.types import ModelOutput

MODES = ("queue", "batch")


class CRD(DistillLoss):
    method = "crd"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)

    def __init__(self, spot: str = EMBEDDING, feat_dim: int = 128, tau: float = 0.07, weight: float = 0.8,
                 mode: str = "queue", negatives: int = 4096):
        super().__init__()
        self.spot = parse_spots(self.method, spot, "spot", single=True)[0]
        self.feat_dim = check_param(self.method, "feat_dim", feat_dim, lo=1)
        self.tau = positive(self.method, "tau", tau)
        self.weight = non_negative(self.method, "weight", weight)
        self.mode = check_param(self.method, "mode", mode, choices=MODES)
        self.negatives = check_param(self.method, "negatives", negatives, lo=1)
        self.head_s: torch.nn.Linear | None = None
        self.head_t: torch.nn.Linear | None = None
        if self.mode == "queue":
            self.register_buffer("queue_s", torch.zeros(negatives, feat_dim))
            self.register_buffer("queue_t", torch.zeros(negatives, feat_dim))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
            self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        s = spot_vector(student_out, self.spot, self.method, "spot")
        t = spot_vector(teacher_out, self.spot, self.method, "spot")
        if self.head_s is None:
            self.head_s = linear(s.shape[1], self.feat_dim, s)
            self.head_t = linear(t.shape[1], self.feat_dim, t)
        if self.mode == "queue":
            for name in ("queue_s", "queue_t", "queue_ptr", "queue_len"):
                setattr(self, name, getattr(self, name).to(s.device))

    def _enqueue(self, z_s: torch.Tensor, z_t: torch.Tensor) -> None:
        """Out of place: the old queue tensors stay intact for this step's backward."""
        n = min(len(z_s), self.negatives)
        idx = (self.queue_ptr + torch.arange(n, device=z_s.device)) % self.negatives
        self.queue_s = self.queue_s.index_copy(0, idx, z_s[-n:].detach().to(self.queue_s.dtype))
        self.queue_t = self.queue_t.index_copy(0, idx, z_t[-n:].detach().to(self.queue_t.dtype))
        self.queue_ptr = (self.queue_ptr + n) % self.negatives
        self.queue_len = (self.queue_len + n).clamp_max(self.negatives)

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        z_s = F.normalize(self.head_s(spot_vector(student_out, self.spot, self.method, "spot")), dim=1)
        z_t = F.normalize(self.head_t(spot_vector(teacher_out, self.spot, self.method, "spot").detach()), dim=1)
        offset, keys_t, keys_s = 0, z_t, z_s
        if distributed.world()[1] > 1:  # the negatives of the global batch: every rank's rows, gradients kept
            sizes = distributed.batch_sizes(len(z_s), z_s.device)
            offset = sum(sizes[:distributed.world()[0]])  # where this rank's rows sit in the global batch
            keys_t, keys_s = distributed.gather(z_t, sizes), distributed.gather(z_s, sizes)
        batch_t, batch_s = keys_t, keys_s
        if self.mode == "queue":
            n = int(self.queue_len)
            keys_t = torch.cat([keys_t, self.queue_t[:n].to(z_t.dtype)])
            keys_s = torch.cat([keys_s, self.queue_s[:n].to(z_s.dtype)])
        positives = torch.arange(len(z_s), device=z_s.device) + offset
        loss_s = F.cross_entropy(z_s @ keys_t.t() / self.tau, positives, reduction="none")
        loss_t = F.cross_entropy(z_t @ keys_s.t() / self.tau, positives, reduction="none")
        if self.mode == "queue" and self.training:
            self._enqueue(batch_s, batch_t)
        return self.weight * (loss_s + loss_t)
