"""``build_selector``: the sample selector named by ``distill.sampling``."""

from __future__ import annotations

from torch import nn

from kdcompress.common.int8 import calibration_batches
from kdcompress.config import QuantizeConfig, SAKDConfig
from kdcompress.data.loader import BatchLoader
from kdcompress.training.ort_teacher import OrtTeacher
from kdcompress.training.selection.base import SampleSelector
from kdcompress.training.selection.full import FullData
from kdcompress.training.selection.random_subset import RandomSubset
from kdcompress.training.selection.sakd import SAKDSelector
from kdcompress.types import UserError

SAMPLINGS = ("full", "sakd", "random")


def int8_calibration(sakd: SAKDConfig, quant: QuantizeConfig, seed: int) -> dict | None:
    """How ``pass_teacher`` calibrates the int8 twin (None: the pass runs the distillation teacher):
    what its outputs depend on besides the teacher and the data, so what the teacher cache keys them by."""
    if sakd.pass_teacher != "int8":
        return None
    return {"samples": quant.samples, "method": quant.calibration, "per_channel": quant.per_channel, "seed": seed,
            "batch_size": 64}


def pass_teacher(sakd: SAKDConfig, teacher: nn.Module | None, loader: BatchLoader, seed: int,
                 quant: QuantizeConfig) -> nn.Module | None:
    """Who runs SAKD's difficulty pass (``sakd.pass_teacher``): None for the distillation teacher
    itself, or for ``int8`` its static int8 twin on onnxruntime, calibrated as the quantize stage
    calibrates (``quant``) on a seeded sample of the training images (the pass only ranks samples)."""
    if sakd.pass_teacher != "int8":
        return None
    if not isinstance(teacher, OrtTeacher):
        raise UserError("sakd.pass_teacher: 'int8' runs the onnxruntime teacher quantized, and this run's teacher "
                        "is PyTorch (CUDA or distill.teacher_runtime: torch); allowed here: same")
    how = int8_calibration(sakd, quant, seed)
    return teacher.int8(calibration_batches(loader.view(how["batch_size"]), how["samples"], how["seed"]), how["method"],
                        how["per_channel"])


def build_selector(sampling: str, sakd: SAKDConfig, distiller: nn.Module, loader: BatchLoader, epochs: int,
                   seed: int = 0, temperature: float | None = None, clean_cache=None,
                   quant: QuantizeConfig = QuantizeConfig()) -> SampleSelector:
    """``full``: every sample, fixed weights. ``random``: a seeded ``sakd.ratio`` subset redrawn every
    ``sakd.interval`` epochs, fixed weights. ``sakd``: SAKDSelector over the training split held by
    ``loader`` (its batch size is the difficulty pass's; it is iterated un-augmented), with the
    difficulty pass on ``pass_teacher()``. The KD temperature of l_i defaults to the distillation
    loss's own ``temperature`` (its initial value when the method schedules it), else 4.
    ``clean_cache``: see ``SAKDSelector`` (with it, the interrupted passes are cached beside it too);
    ``quant``: the int8 pass teacher's calibration."""
    if sampling == "full":
        return FullData(len(loader))
    if sampling == "random":
        return RandomSubset(len(loader), sakd.ratio, sakd.interval, seed)
    if sampling == "sakd":
        if temperature is None:
            temperature = float(getattr(distiller.loss, "temperature", 4.0))
        return SAKDSelector(sakd, distiller, loader, epochs=epochs, temperature=temperature, seed=seed,
                            pass_teacher=pass_teacher(sakd, distiller.teacher, loader, seed, quant),
                            clean_cache=clean_cache, cache_interrupted=True)
    raise UserError(f"distill.sampling: {sampling!r} is not allowed; allowed: {', '.join(SAMPLINGS)}")
