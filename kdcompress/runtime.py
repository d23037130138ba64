"""Where and how training runs: the device, the seeds and the training precision."""

from __future__ import annotations

import random

import numpy as np
import torch

from kdcompress.common.host import cpu_flags, native_bf16
from kdcompress.types import UserError


def resolve_device(name: str) -> torch.device:
    """``base.device``; on CUDA, cuDNN picks the fastest kernels for the fixed batch shapes."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("base.device: 'cuda' asked for but no CUDA device is available; allowed here: auto, cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def seed_everything(seed: int, num_threads: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if num_threads:
        torch.set_num_threads(num_threads)


def has_depthwise(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a depthwise convolution (one filter per input channel)."""
    return any(isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels for m in model.modules())


def resolve_precision(precision: str, model: torch.nn.Module, device: torch.device) -> tuple[str, str]:
    """The precision a training stage (teacher.precision, distill.precision: ``precision``) runs ``model`` in,
    and why. ``auto`` is a fixed rule, never a timing, so the same params on the same kind of host give the
    same weights: bf16 on a GPU that has it (fp16 on one that does not); on a CPU, bf16 only where it is
    native (AVX-512 BF16, AMX, ARM bf16) and the network has no depthwise convolution; fp32 otherwise.
    Measured on an AVX-512 BF16 EPYC (steps alternating in one process, batch 128): the ResNet-20 teacher
    trained 1.76x faster in bf16, the depthwise mobilenet:16 student 0.75x; benchmarks/bf16.py measures a host."""
    if precision != "auto":
        return precision, "as set"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: a GPU with bf16"
        return "fp16", "auto: a GPU without bf16"
    if not native_bf16():
        return "fp32", f"auto: this CPU has no native bf16: {', '.join(cpu_flags()) or 'no flags read'}"
    if has_depthwise(model):
        return "fp32", "auto: depthwise convolutions are slower in bf16 on the CPU"
    return "bf16", "auto: a CPU with native bf16, no depthwise convolutions"
