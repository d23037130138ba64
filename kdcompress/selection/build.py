"""``build_selector``: the sample selector named by ``distill.sampling``."""

from __future__ import annotations

from torch import nn

from kdcompress.config import SAKDConfig
from kdcompress.data import BatchLoader
from kdcompress.selection.base import SampleSelector
from kdcompress.selection.full import FullData
from kdcompress.selection.sakd import SAKDSelector
from kdcompress.types import UserError

SAMPLINGS = ("full", "sakd")


def build_selector(sampling: str, sakd: SAKDConfig, distiller: nn.Module, loader: BatchLoader, epochs: int,
                   seed: int = 0, temperature: float | None = None,
                   pass_teacher: nn.Module | None = None, clean_cache=None) -> SampleSelector:
    """``full``: every sample, fixed weights. ``sakd``: SAKDSelector over the training split held by
    ``loader`` (its batch size is the difficulty pass's; it is iterated un-augmented). The KD
    temperature of l_i defaults to the distillation loss's own ``temperature`` (its initial value
    when the method schedules it), else 4. ``pass_teacher``, ``clean_cache``: see ``SAKDSelector``."""
    if sampling == "full":
        return FullData(len(loader))
    if sampling == "sakd":
        if temperature is None:
            temperature = float(getattr(distiller.loss, "temperature", 4.0))
        return SAKDSelector(sakd, distiller, loader, epochs=epochs, temperature=temperature, seed=seed,
                            pass_teacher=pass_teacher, clean_cache=clean_cache)
    raise UserError(f"distill.sampling: {sampling!r} is not allowed; allowed: {', '.join(SAMPLINGS)}")
