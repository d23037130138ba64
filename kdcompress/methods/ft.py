"""Factor transfer: Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor
Transfer", NeurIPS 2018.

A paraphraser (a convolutional auto-encoder on the teacher's last feature map, factor width
``rate * C_t``) extracts teacher factors; a translator (three convolutions on the student's map)
produces student factors; per sample ``weight * mean |F_s / ||F_s|| - F_t / ||F_t|| |`` (p = 1,
the factors flattened and L2-normalised; mean rather than the paper's sum, as in the CRD
benchmark, whose weight 200 and rate 0.5 we take).

The paper pre-trains the paraphraser on the teacher (reconstruction loss) before the student
trains. Here it is trained jointly and honestly: from the first step it minimises its own
reconstruction loss ``recon_weight * mean (P(f_t) - f_t)^2`` (added to the per-sample loss; it
only reaches the paraphraser, since the teacher is frozen), and the factor-transfer term uses the
teacher factor DETACHED, so the student never pulls the paraphraser towards itself (no collapse).
Early in training the student therefore chases a moving target that settles as the auto-encoder
converges. ``paraphraser_epochs: N`` is the paper's two-stage schedule inside one run: for the
first N epochs only the reconstruction term is on (the student learns from the labels alone),
then factor transfer starts. Where spatial sizes differ the larger map is average-pooled first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.methods._features import match_spatial, parse_spots, per_sample_mean, spot_map
from kdcompress.methods._params import check_param, non_negative
from kdcompress.methods.base import DistillLoss
from kdcompress.types import ModelOutput


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """Auto-encoder on the teacher map: ``C_t -> C_t -> k -> k`` (factor) ``-> k -> C_t -> C_t``."""

    def __init__(self, c_t: int, k: int):
        super().__init__()
        self.encoder = nn.Sequential(*_conv_block(c_t, c_t), *_conv_block(c_t, k), *_conv_block(k, k))
        self.decoder = nn.Sequential(*_conv_block(k, k), *_conv_block(k, c_t), *_conv_block(c_t, c_t))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(f)
        return factor, self.decoder(factor)


def factor_vector(f: torch.Tensor) -> torch.Tensor:
    return F.normalize(f.flatten(1), dim=1)


class FT(DistillLoss):
    method = "ft"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)

    def __init__(self, spot: str = "stage3", rate: float = 0.5, weight: float = 200.0, recon_weight: float = 1.0,
                 paraphraser_epochs: int = 0):
        super().__init__()
        self.paraphraser_epochs = check_param(self.method, "paraphraser_epochs", paraphraser_epochs, lo=0)
        self.transfer_on = paraphraser_epochs == 0
        self.spot = parse_spots(self.method, spot, "spot", maps=True, single=True)[0]
        self.rate = check_param(self.method, "rate", rate, lo=0.0, hi=1.0, lo_open=True)
        self.weight = non_negative(self.method, "weight", weight)
        self.recon_weight = non_negative(self.method, "recon_weight", recon_weight)
        self.paraphraser: Paraphraser | None = None
        self.translator: nn.Module | None = None

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        s = spot_map(student_out, self.spot, self.method, "spot")
        t = spot_map(teacher_out, self.spot, self.method, "spot")
        if self.paraphraser is None:
            k = max(1, round(t.shape[1] * self.rate))
            c_s = s.shape[1]
            self.paraphraser = Paraphraser(t.shape[1], k).to(device=t.device, dtype=t.dtype)
            self.translator = nn.Sequential(*_conv_block(c_s, c_s), *_conv_block(c_s, k), *_conv_block(k, k)
                                            ).to(device=s.device, dtype=s.dtype)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.transfer_on = epoch >= self.paraphraser_epochs

    def forward(self, student_out: ModelOutput, teacher_out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(spot_map(student_out, self.spot, self.method, "spot"),
                             spot_map(teacher_out, self.spot, self.method, "spot"))
        t = t.detach()
        factor_t, recon = self.paraphraser(t)
        loss = self.recon_weight * per_sample_mean((recon - t).pow(2))
        if self.transfer_on:
            transfer = (factor_vector(self.translator(s)) - factor_vector(factor_t.detach())).abs().mean(1)
            loss = loss + self.weight * transfer
        return loss
