"""How stored pixels become training and evaluation inputs: the geometry recorded in the prepared
data's meta.json (output size, the evaluation's centre crop, the training transform), and the
per-sample random draws of each training transform, pure functions of (seed, epoch, sample).

Both loaders (memory: whole batches on the device; stream: one file at a time in DataLoader workers)
take their shuffle order and their draws from here, so an epoch can be replayed in any order, in any
process and with any number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

TRAIN_TRANSFORMS = ("pad_crop_flip", "random_resized_crop")


@dataclass(frozen=True)
class Geometry:
    size: int = 0  # output side in px; 0: as stored (the built-in data sets without data.image_size)
    crop_fraction: float = 1.0  # evaluation: resize the shorter side to size / f, centre-crop size
    train_transform: str = "pad_crop_flip"  # pad_crop_flip | random_resized_crop
    crop_scale: float = 0.08  # random_resized_crop: smallest area fraction
    crop_ratio: float = 4 / 3  # random_resized_crop: aspect ratios in [1/r, r]

    def __post_init__(self):
        if self.train_transform not in TRAIN_TRANSFORMS:
            raise ValueError(f"train_transform {self.train_transform!r}; allowed: {', '.join(TRAIN_TRANSFORMS)}")

    @property
    def decode_side(self) -> int:
        """The smallest shorter side a file is decoded at (JPEG DCT scaling), as ``predict.read_pixels``
        chooses it: enough pixels for the evaluation's centre crop."""
        return math.ceil(self.size / self.crop_fraction)

    def as_dict(self) -> dict:
        return asdict(self)


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, stream): epochs can be replayed in any
    order, in any process (resume, the teacher-output cache). Streams: 0 the shuffle order, 1 the
    pad-crop-flip draws, 2 the random-resized-crop draws, 3 the random subset's rounds."""
    mixed = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 31 | int(mixed[1]) >> 1)


def epoch_batches(n: int, indices: torch.Tensor | None, batch_size: int, shuffle: bool, seed: int, epoch: int,
                  shard: tuple[int, int], device: torch.device | str) -> Iterator[torch.Tensor]:
    """The sample indices of every batch of an epoch over ``indices`` (default: all ``n``), shuffled by
    stream 0 of ``epoch_generator``; ``shard=(rank, world)``: this rank's contiguous, near-equal part of
    every global batch (the same global batches in every rank)."""
    idx = torch.arange(n, device=device) if indices is None else indices.to(device)
    if shuffle:
        perm = torch.randperm(len(idx), generator=epoch_generator(seed, epoch, 0))
        idx = idx[perm.to(device)]
    for start in range(0, len(idx), batch_size):
        yield idx[start:start + batch_size].tensor_split(shard[1])[shard[0]]


def pad_crop_draws(seed: int, epoch: int, n: int, padding: int,
                   hflip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (dy, dx, flip) of ``n`` samples in ``epoch``: the crop offset into the image padded by
    ``padding`` on every side (0..2*padding each) and whether to flip it horizontally."""
    g, span = epoch_generator(seed, epoch, 1), 2 * padding + 1
    dy = torch.randint(0, span, (n,), generator=g)
    dx = torch.randint(0, span, (n,), generator=g)
    flip = (torch.rand(n, generator=g) < 0.5) & hflip
    return dy, dx, flip


def pad_crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image of ``x`` [B, C, H, W] (any dtype) at offset (dy, dx) of its zero-padded copy,
    then flip it where ``flip``."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = (torch.arange(h, device=x.device) + dy[:, None])[:, None, :, None]  # [n, 1, h, 1]
        cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, None, :]  # [n, 1, 1, w]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def resized_crop_draws(seed: int, epoch: int, n: int, scale: float, ratio: float,
                       hflip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample crop boxes (float64 [n, 4]: x0, y0, x1, y1 as fractions of a square image) and flips
    of ``n`` samples in ``epoch``: the area fraction uniform in [scale, 1], the aspect ratio (width /
    height) log-uniform in [1/ratio, ratio], the position uniform in the room left. Where the drawn
    width or height exceeds the image, it is clamped to the image (torchvision's RandomResizedCrop
    redraws up to 10 times instead): one draw per sample, so any sample's box is computed alone."""
    g = epoch_generator(seed, epoch, 2)
    area = scale + (1 - scale) * torch.rand(n, generator=g, dtype=torch.float64)
    aspect = torch.exp((2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * math.log(ratio))
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    u, v = torch.rand(2, n, generator=g, dtype=torch.float64)
    flip = (torch.rand(n, generator=g) < 0.5) & hflip
    x0, y0 = u * (1 - w), v * (1 - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1), flip


def box_in_pixels(frac_box: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """A ``resized_crop_draws`` box [..., 4] as a pixel box (x0, y0, x1, y1) of a ``width`` x ``height``
    image: the drawn area fraction and aspect ratio applied to this image (so the crop keeps the drawn
    aspect ratio on a non-square image too), clamped inside it, at the same relative position in the
    room left (centred where the fraction box left none). On a square image: ``frac_box * width``."""
    x0, y0, x1, y1 = frac_box.unbind(-1)
    fw, fh = x1 - x0, y1 - y0
    pixels, aspect = fw * fh * (width * height), fw / fh
    w, h = (pixels * aspect).sqrt().clamp(max=width), (pixels / aspect).sqrt().clamp(max=height)
    u = torch.where(fw < 1, x0 / (1 - fw).clamp_min(1e-12), 0.5)
    v = torch.where(fh < 1, y0 / (1 - fh).clamp_min(1e-12), 0.5)
    left, top = u * (width - w), v * (height - h)
    return torch.stack([left, top, left + w, top + h], dim=-1)


def resized_crop_batch(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor,
                       size: int | tuple[int, int]) -> torch.Tensor:
    """Each image of the float batch ``x`` [B, C, H, W], its box (fractions of that image, [B, 4])
    resized to ``size`` (an int: square; or (h, w)) with bilinear sampling, flipped horizontally where
    ``flip``: one affine_grid + grid_sample (align_corners=False; edge pixels repeat beyond the border).
    Unlike Pillow's resize (the stream path), shrinking does not antialias."""
    oh, ow = (size, size) if isinstance(size, int) else size
    if len(x) == 0:
        return x.new_empty(0, x.shape[1], oh, ow)
    x0, y0, x1, y1 = boxes.to(x.device, x.dtype).unbind(-1)
    sx = torch.where(flip.to(x.device), x0 - x1, x1 - x0)  # a negative x scale mirrors the box
    theta = torch.zeros(len(x), 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sx, x0 + x1 - 1  # [-1, 1] output -> the box in [-1, 1] input coords
    theta[:, 1, 1], theta[:, 1, 2] = y1 - y0, y0 + y1 - 1
    grid = torch.nn.functional.affine_grid(theta, [len(x), x.shape[1], oh, ow], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class BatchSource:
    """What both loaders share (``BatchLoader`` in memory, ``StreamLoader`` from files): the labels on
    the device, the normalisation, the batch size and the augmentation settings."""

    def __init__(self, labels: torch.Tensor, mean: list[float], std: list[float], device: torch.device | str,
                 batch_size: int, crop_padding: int, hflip: bool, seed: int, geometry: Geometry):
        self.labels = labels.to(device)
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.batch_size = batch_size
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.seed = seed
        self.geometry = geometry

    def __len__(self) -> int:
        return len(self.labels)

    def num_batches(self, n: int | None = None) -> int:
        n = len(self) if n is None else n
        return (n + self.batch_size - 1) // self.batch_size

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """A float batch in [0, 1] as the model's input: normalised per channel, channels_last."""
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
