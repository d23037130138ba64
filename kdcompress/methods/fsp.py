"""Flow of solution procedure: Yim, Joo, Bae, Kim, "A Gift from Knowledge Distillation: Fast
Optimization, Network Minimization and Transfer Learning", CVPR 2017.

The FSP matrix between two consecutive spots ``F1 [C1, H, W]`` and ``F2 [C2, H, W]`` is
``G_ij = sum_{h,w} F1_i F2_j / (H W)``; per sample ``weight * sum_pairs mean_{ij} (G_s - G_t)^2``.
Within a network the two maps of a pair may differ in size (stride-2 stages): the larger is
average-pooled to the smaller. Across networks the matrices must have the same shape: where the
student's channels differ from the teacher's at a spot, a learned 1x1 convolution maps the
student's map to the teacher's width (built in ``setup()``). The paper trains the FSP stage first
and then the task; we train them jointly with weight 50, the CRD benchmark's value (``-b 50``).
The mean over matrix entries and the 1/(HW) keep the weight independent of our sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from kdcompress.methods._features import conv1x1, match_spatial, parse_spots, per_sample_mean, spot_map
from kdcompress.methods._params import non_negative
from kdcompress.methods.base import PerSpotLoss
from kdcompress.types import ModelOutput


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = match_spatial(a, b)
    return torch.einsum("bihw,bjhw->bij", a, b) / (a.shape[-2] * a.shape[-1])


class FSP(PerSpotLoss):
    method = "fsp"
    default_weights = (1.0, 1.0)  # CE + weight * this term (the published recipe)

    def __init__(self, spots: str = "stage1,stage2,stage3", weight: float = 50.0):
        super().__init__()
        self.spots = parse_spots(self.method, spots, maps=True, min_count=2)
        self.weight = non_negative(self.method, "weight", weight)
        self.adapters = nn.ModuleDict()

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput) -> None:
        for name in self.spots:
            s, t = spot_map(student_out, name, self.method), spot_map(teacher_out, name, self.method)
            if s.shape[1] != t.shape[1] and name not in self.adapters:
                self.adapters[name] = conv1x1(s.shape[1], t.shape[1], s)

    def _maps(self, out: ModelOutput, adapt: bool, names: tuple[str, ...]) -> list[torch.Tensor]:
        maps = [spot_map(out, name, self.method) for name in names]
        if adapt:
            maps = [self.adapters[n](m) if n in self.adapters else m for n, m in zip(names, maps)]
        return maps

    def spot_names(self) -> tuple[str, ...]:
        """An FSP matrix joins two consecutive spots; its term sits at the deeper one."""
        return self.spots[1:]

    def spot_loss(self, name: str, student_out: ModelOutput, teacher_out: ModelOutput,
                  target: torch.Tensor) -> torch.Tensor:
        i = self.spots.index(name)
        pair = self.spots[i - 1:i + 1]
        s_maps, t_maps = self._maps(student_out, True, pair), self._maps(teacher_out, False, pair)
        return self.weight * per_sample_mean((fsp_matrix(*s_maps) - fsp_matrix(*t_maps)).pow(2))
