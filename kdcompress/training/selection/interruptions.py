"""SAKD's interruptions of the difficulty pass: spatial dropout of pixel positions and a pixel or patch
shuffle, each image's mask or permutation a pure function of ``(seed, epoch of the round, dataset index)``
(counter-based hashing), so any number of processes, any batch size and a resumed run interrupt every
sample the same way."""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x):
    """A bijective 32-bit integer hash of ``x`` in [0, 2**32), an int or an int64 tensor (C. Wellons'
    hash-prospector two-round xorshift-multiply; both odd multipliers are below 2**31, so no product
    overflows int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def sample_keys(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per sample [B] (int64), a pure function of ``(seed, epoch, dataset index)``:
    the interruption of a sample never depends on the batch it is in, on the rank, or on what ran
    before."""
    return _mix32(_mix32(_mix32(seed & _MASK32) ^ (epoch & _MASK32)) ^ index.long())


def position_noise(keys: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` pseudo-random 32-bit values per key [B, n] (int64), counter-based: row ``b`` is a pure
    function of ``keys[b]``, and its values are distinct (so ``argsort`` has no ties)."""
    return _mix32(keys[:, None] ^ _mix32(torch.arange(n, device=keys.device)))


def spatial_dropout(x: torch.Tensor, beta: float, keys: torch.Tensor, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Set ``floor(beta * H * W)`` pixel positions of each image (all channels) to ``fill`` (a scalar or
    per channel [1, C, 1, 1]; the normalised value of a black pixel when ``x`` is normalised), the
    positions drawn from the image's key (``sample_keys``). ``x`` [B, C, H, W]; returns a new tensor."""
    b, _, h, w = x.shape
    m = math.floor(beta * h * w)
    if m <= 0:
        return x
    noise = position_noise(keys, h * w)
    drop = noise <= noise.kthvalue(m, dim=1, keepdim=True).values  # the m smallest: the values are distinct
    return torch.where(drop.view(b, 1, h, w), fill, x)


def spatial_shuffle(x: torch.Tensor, patch_size: int, keys: torch.Tensor) -> torch.Tensor:
    """Permute the spatial positions of each image (all channels together) by a permutation drawn from
    the image's key (``sample_keys``): single pixels for ``patch_size == 1``, else ``patch_size`` x
    ``patch_size`` patches (when H or W is not a multiple, the patch grid covers the top-left part and
    the border stays). Commutes with per-channel normalisation."""
    b, c, h, w = x.shape
    p = max(1, int(patch_size))
    gh, gw = h // p, w // p
    if gh * gw <= 1:
        return x
    region = x[:, :, :gh * p, :gw * p]
    # [b, c, gh, p, gw, p] -> [b, gh*gw, c, p, p]
    patches = region.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)
    perm = position_noise(keys, gh * gw).argsort(dim=1)
    patches = patches[torch.arange(b, device=x.device)[:, None], perm]
    region = patches.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * p, gw * p)
    out = x.clone()
    out[:, :, :gh * p, :gw * p] = region
    return out
