"""Shared helpers of the feature-based methods: which spots to distil, how to read them from a
``ModelOutput``, how to align teacher and student maps, and the small learned adapters.

Spots are a comma-separated string of names (``"stage1,stage2,stage3"``): the model's named
feature maps (shallow -> deep, ``[B, C, H, W]``) or ``embedding`` (the pooled penultimate feature
``[B, D]`` that feeds the classifier). Where a method needs a map, the embedding is read as a
``[B, D, 1, 1]`` map; where it needs a vector, a map is global-average-pooled.

Teacher and student maps at the same spot may differ in channels (adapters: 1x1 convolutions
owned by the loss, built in ``setup()``) and in spatial size (the larger map is adaptive-average-
pooled to the smaller one: never upsampled, so no invented detail and no extra cost).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcompress.types import ModelOutput, UserError

EMBEDDING = "embedding"


def parse_spots(method: str, value: str, key: str = "spots", *, maps: bool = False, single: bool = False,
                min_count: int = 1) -> tuple[str, ...]:
    """Split and check a spots string. ``maps``: the method needs spatial maps (no embedding);
    ``single``: exactly one spot; ``min_count``: at least that many spots (FSP needs pairs)."""
    names = tuple(s.strip() for s in value.split(",") if s.strip())
    where = f"methods.{method}.{key}"
    if single and len(names) != 1:
        raise UserError(f"{where}: expected one spot, got {value!r}; "
                        f"allowed: a stage name (e.g. stage3) or {EMBEDDING}")
    if len(names) < min_count:
        raise UserError(f"{where}: expected at least {min_count} comma-separated spots, got {value!r}; "
                        "allowed: stage names, e.g. stage1,stage2,stage3")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: a spot is listed twice in {value!r}")
    if maps and EMBEDDING in names:
        raise UserError(f"{where}: this method needs spatial feature maps, not {EMBEDDING!r}; "
                        "allowed: stage names, e.g. stage1,stage2,stage3")
    return names


def feature(out: ModelOutput, name: str, method: str, key: str = "spots") -> torch.Tensor:
    """The tensor at spot ``name`` (a feature map, or the embedding); a clear error if absent."""
    if name == EMBEDDING and out.embedding is not None:
        return out.embedding
    if name in out.features:
        return out.features[name]
    available = [*out.features, *([EMBEDDING] if out.embedding is not None else [])]
    raise UserError(f"methods.{method}.{key}: the model has no feature {name!r}; available: {', '.join(available)}")


def require_spots(method: str, names: tuple[str, ...], *outs: ModelOutput, key: str = "spots") -> None:
    """Fail early (in ``setup()``), with the available names, on a spot a model lacks."""
    for out in outs:
        for name in names:
            feature(out, name, method, key)


def as_map(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` as is; a vector ``[B, D]`` as a ``[B, D, 1, 1]`` map."""
    return t if t.dim() == 4 else t[:, :, None, None]


def as_vector(t: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` as is; a map ``[B, C, H, W]`` global-average-pooled to ``[B, C]``."""
    return t if t.dim() == 2 else t.mean(dim=(2, 3))


def spot_map(out: ModelOutput, name: str, method: str, key: str = "spots") -> torch.Tensor:
    return as_map(feature(out, name, method, key))


def spot_vector(out: ModelOutput, name: str, method: str, key: str = "spots") -> torch.Tensor:
    return as_vector(feature(out, name, method, key))


def pool_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the larger of two maps to the smaller's height and width (each axis separately)."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return pool_to(a, size), pool_to(b, size)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension: ``[B, ...] -> [B]``."""
    return x.flatten(1).mean(1)


def conv1x1(c_in: int, c_out: int, like: torch.Tensor, bias: bool = True) -> nn.Conv2d:
    """A 1x1 convolution on ``like``'s device and dtype (the usual channel adapter/regressor)."""
    return nn.Conv2d(c_in, c_out, 1, bias=bias).to(device=like.device, dtype=like.dtype)


def linear(d_in: int, d_out: int, like: torch.Tensor) -> nn.Linear:
    return nn.Linear(d_in, d_out).to(device=like.device, dtype=like.dtype)


def broadcast_batch(value: torch.Tensor, batch: int) -> torch.Tensor:
    """A batch-level scalar loss broadcast to ``[B]`` (the DistillLoss contract)."""
    return value.expand(batch)
