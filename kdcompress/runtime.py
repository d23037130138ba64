"""Where and how training runs: the device and the seeds."""

from __future__ import annotations

import random

import numpy as np
import torch

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
