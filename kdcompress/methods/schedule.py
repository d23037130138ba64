"""Epoch schedules shared by the methods: the temperature schedule of the logit methods and the
linear warm-up of a loss weight. Both are applied in ``on_epoch_start`` (0-based epochs), so a
resumed run recomputes them instead of storing them.

Temperature schedule (hyper-parameters ``temperature``, ``t_schedule``, ``t_end`` on every method
that compares softened distributions: kd, fkd, dkd, dml, online_ema, data_free):

* ``constant``: ``T = temperature`` every epoch (``t_end`` is ignored);
* ``linear``:   ``T`` goes linearly from ``temperature`` (first epoch) to ``t_end`` (last epoch);
* ``cosine``:   ``T = t_end + (temperature - t_end) * (1 + cos(pi * e / (E - 1))) / 2``.

With ``t_end < temperature`` the targets sharpen over training (soft -> hard), the usual
annealing direction; ``t_end > temperature`` is allowed too.
"""

from __future__ import annotations

import math

from kdcompress.methods._params import check_param, positive

T_SCHEDULES = ("constant", "linear", "cosine")


def scheduled_value(schedule: str, start: float, end: float, epoch: int, epochs: int) -> float:
    """The value at 0-based ``epoch`` of ``epochs``: ``start`` at the first, ``end`` at the last."""
    if schedule == "constant" or epochs <= 1:
        return start
    progress = min(max(epoch / (epochs - 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def warmup_factor(epoch: int, warmup: int) -> float:
    """Linear warm-up ``min((epoch + 1) / warmup, 1)``: epochs counted from 1 as in DKD's code
    (mdistiller), so the first epoch already carries ``1 / warmup`` of the weight; ``warmup <= 0``
    disables it."""
    return 1.0 if warmup <= 0 else min((epoch + 1) / warmup, 1.0)


class TemperatureScheduled:
    """Mixin for DistillLoss subclasses with a temperature: call ``init_temperature`` in
    ``__init__``; ``self.temperature`` then holds the current epoch's value."""

    method: str
    temperature: float

    def init_temperature(self, temperature: float, t_schedule: str, t_end: float) -> None:
        self.t_start = positive(self.method, "temperature", temperature)
        self.t_schedule = check_param(self.method, "t_schedule", t_schedule, choices=T_SCHEDULES)
        self.t_end = positive(self.method, "t_end", t_end)
        self.temperature = self.t_start

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self.temperature = scheduled_value(self.t_schedule, self.t_start, self.t_end, epoch, epochs)
