"""Batches of normalised images from a prepared split held in memory (uint8 tensors on the device),
augmented as whole batches; every random choice is a pure function of (seed, epoch, sample).
``make_loader`` picks this loader or the streaming one (``kdcompress.data.stream``) for a split."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from kdcompress.data.prepared import Prepared, Split
from kdcompress.data.stream import FileSplit, StreamLoader
from kdcompress.data.transforms import (
    BatchSource,
    Geometry,
    box_in_pixels,
    epoch_batches,
    epoch_generator,
    pad_crop,
    pad_crop_draws,
    resized_crop_batch,
    resized_crop_draws,
)

__all__ = ["BatchLoader", "epoch_generator", "make_loader"]


class BatchLoader(BatchSource):
    """Batches of (x, y, index) from a uint8 split held on ``device``.

    ``x`` is float, normalised with the data set's mean/std and in channels_last memory format.
    With ``augment``, ``geometry.train_transform`` says how: "pad_crop_flip", a random crop of the
    image zero-padded by ``crop_padding``; "random_resized_crop", a random box (``geometry.crop_scale``,
    ``crop_ratio``) resized back to the stored size; then, with ``hflip``, a random horizontal flip.
    The shuffle order of epoch ``e`` and the augmentation of sample ``i`` in epoch ``e`` are pure
    functions of ``(seed, e, i)``: no generator state is carried from one epoch to the next.
    ``transform`` (optional) maps a float batch in [0, 1] before normalisation (SAKD's
    interruptions use it).
    """

    def __init__(self, split: Split, mean: list[float], std: list[float], device: torch.device | str = "cpu",
                 batch_size: int = 128, crop_padding: int = 0, hflip: bool = False, seed: int = 0,
                 geometry: Geometry = Geometry()):
        super().__init__(split.labels, mean, std, device, batch_size, crop_padding, hflip, seed, geometry)
        self.images = split.images.to(device)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every ``x`` this loader yields."""
        return tuple(self.images.shape[1:])

    def view(self, batch_size: int) -> BatchLoader:
        """A loader over the same tensors (no copy, on the same device), un-augmented, with its own
        batch size."""
        return BatchLoader(Split(self.images, self.labels), self.mean.flatten().tolist(), self.std.flatten().tolist(),
                           self.device, batch_size=batch_size, seed=self.seed, geometry=self.geometry)

    def batches(self, indices: torch.Tensor | None = None, shuffle: bool = False, augment: bool = False,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None, epoch: int = 0,
                shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``shard=(rank, world)``: this rank's part of every batch (contiguous, near-equal parts of the
        same global batches in every rank)."""
        draws = self.augmentation(epoch) if augment else None
        for b in epoch_batches(len(self), indices, self.batch_size, shuffle, self.seed, epoch, shard, self.device):
            x = self.images[b].float().div_(255.0)
            if draws is not None:
                x = self.augment(x, *(d[b] for d in draws))
            if transform is not None:
                x = transform(x)
            x = self.normalise(x)
            yield x, self.labels[b], b

    def augmentation(self, epoch: int) -> tuple[torch.Tensor, ...]:
        """Per-sample draws of every sample of the split in ``epoch``, on the device: (dy, dx, flip) for
        pad_crop_flip, (boxes as fractions of the stored image [n, 4], flip) for random_resized_crop."""
        g = self.geometry
        if g.train_transform == "random_resized_crop":
            boxes, flip = resized_crop_draws(self.seed, epoch, len(self), g.crop_scale, g.crop_ratio, self.hflip)
            h, w = self.images.shape[-2:]
            boxes = box_in_pixels(boxes, w, h) / torch.tensor([w, h, w, h], dtype=boxes.dtype)
            return boxes.float().to(self.device), flip.to(self.device)
        return tuple(d.to(self.device) for d in pad_crop_draws(self.seed, epoch, len(self), self.crop_padding,
                                                               self.hflip))

    def augment(self, x: torch.Tensor, *draws: torch.Tensor) -> torch.Tensor:
        """The float batch ``x`` augmented with its samples' ``augmentation`` draws."""
        if self.geometry.train_transform == "random_resized_crop":
            return resized_crop_batch(x, *draws, tuple(x.shape[-2:]))
        return pad_crop(x, *draws, self.crop_padding)


def make_loader(data: Prepared, split: str, device: torch.device | str, batch_size: int, workers: int = 0,
                **kw) -> BatchLoader | StreamLoader:
    """A loader over ``data``'s split ``split`` ('train', 'val' or 'test'), normalised with the data set's
    statistics and shaped by its geometry: a StreamLoader (``workers`` decoding processes) for a split of
    files, a BatchLoader for one held in memory. ``kw``: crop_padding, hflip, seed."""
    part = getattr(data, split)
    geometry = getattr(data, "geometry", Geometry())
    if isinstance(part, FileSplit):
        return StreamLoader(part, data.mean, data.std, device, batch_size, geometry=geometry,
                            channels=data.input_shape[0], workers=workers, **kw)
    return BatchLoader(part, data.mean, data.std, device, batch_size, geometry=geometry, **kw)


def fit_loaders(data: Prepared, device: torch.device | str, cfg, workers: int,
                seed: int) -> tuple[BatchLoader | StreamLoader, BatchLoader | StreamLoader]:
    """The two loaders of one fit() run: train (``cfg``'s batch size, crop padding and flip, batch order and
    augmentation seeded by ``seed``) and val (``cfg.eval_batch_size``); ``cfg``: a TrainConfig."""
    train = make_loader(data, "train", device, cfg.batch_size, workers=workers, crop_padding=cfg.crop_padding,
                        hflip=cfg.hflip, seed=seed)
    return train, make_loader(data, "val", device, cfg.eval_batch_size, workers=workers)
