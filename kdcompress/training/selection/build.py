"""``build_selector``: the sample selector named by ``distill.sampling``."""

from __future__ import annotations

from torch import nn

from kdcompress.common.int8 import CALIBRATION_SAMPLES, calibration_batches
from kdcompress.config import SAKDConfig
from kdcompress.data.loader import BatchLoader
from kdcompress.training.ort_teacher import OrtTeacher
from kdcompress.training.selection.base import SampleSelector
from kdcompress.training.selection.full import FullData
from kdcompress.training.selection.sakd import SAKDSelector
from kdcompress.types import UserError

SAMPLINGS = ("full", "sakd")


def pass_teacher(sakd: SAKDConfig, teacher: nn.Module | None, loader: BatchLoader, seed: int) -> nn.Module | None:
    """Who runs SAKD's difficulty pass (``sakd.pass_teacher``): None for the distillation teacher
    itself, or for ``int8`` its static int8 twin on onnxruntime, calibrated on a seeded sample of
    the training images (the pass only ranks samples)."""
    if sakd.pass_teacher != "int8":
        return None
    if not isinstance(teacher, OrtTeacher):
        raise UserError("sakd.pass_teacher: 'int8' runs the onnxruntime teacher quantized, and this run's teacher "
                        "is PyTorch (CUDA or distill.teacher_runtime: torch); allowed here: same")
    return teacher.int8(calibration_batches(loader.view(64), CALIBRATION_SAMPLES, seed))


def build_selector(sampling: str, sakd: SAKDConfig, distiller: nn.Module, loader: BatchLoader, epochs: int,
                   seed: int = 0, temperature: float | None = None, clean_cache=None) -> SampleSelector:
    """``full``: every sample, fixed weights. ``sakd``: SAKDSelector over the training split held by
    ``loader`` (its batch size is the difficulty pass's; it is iterated un-augmented), with the
    difficulty pass on ``pass_teacher()``. The KD temperature of l_i defaults to the distillation
    loss's own ``temperature`` (its initial value when the method schedules it), else 4.
    ``clean_cache``: see ``SAKDSelector``."""
    if sampling == "full":
        return FullData(len(loader))
    if sampling == "sakd":
        if temperature is None:
            temperature = float(getattr(distiller.loss, "temperature", 4.0))
        return SAKDSelector(sakd, distiller, loader, epochs=epochs, temperature=temperature, seed=seed,
                            pass_teacher=pass_teacher(sakd, distiller.teacher, loader, seed), clean_cache=clean_cache)
    raise UserError(f"distill.sampling: {sampling!r} is not allowed; allowed: {', '.join(SAMPLINGS)}")
