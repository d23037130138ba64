"""Batches of normalised images from a prepared split held in memory (uint8 tensors on the device),
augmented as whole batches; every random choice is a pure function of (seed, epoch, sample)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from kdcompress.data.prepared import Prepared, Split


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, stream): epochs can be replayed in any
    order, in any process (resume, the teacher-output cache)."""
    mixed = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 31 | int(mixed[1]) >> 1)


class BatchLoader:
    """Batches of (x, y, index) from a uint8 split held on ``device``.

    ``x`` is float, normalised with the data set's mean/std and in channels_last memory format.
    With ``augment``: random crop with zero padding and random horizontal flip. The shuffle order
    of epoch ``e`` and the crop/flip of sample ``i`` in epoch ``e`` are pure functions of
    ``(seed, e, i)``: no generator state is carried from one epoch to the next.
    ``transform`` (optional) maps a float batch in [0, 1] before normalisation (SAKD's
    interruptions use it).
    """

    def __init__(self, split: Split, mean: list[float], std: list[float], device: torch.device | str = "cpu",
                 batch_size: int = 128, crop_padding: int = 0, hflip: bool = False, seed: int = 0):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.batch_size = batch_size
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def view(self, batch_size: int) -> BatchLoader:
        """A loader over the same tensors (no copy, on the same device), un-augmented, with its own
        batch size."""
        return BatchLoader(Split(self.images, self.labels), self.mean.flatten().tolist(), self.std.flatten().tolist(),
                           self.device, batch_size=batch_size, seed=self.seed)

    def num_batches(self, n: int | None = None) -> int:
        n = len(self) if n is None else n
        return (n + self.batch_size - 1) // self.batch_size

    def batches(self, indices: torch.Tensor | None = None, shuffle: bool = False, augment: bool = False,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None, epoch: int = 0,
                shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``shard=(rank, world)``: this rank's part of every batch (contiguous, near-equal parts of the
        same global batches in every rank)."""
        idx = torch.arange(len(self), device=self.device) if indices is None else indices.to(self.device)
        if shuffle:
            perm = torch.randperm(len(idx), generator=epoch_generator(self.seed, epoch, 0))
            idx = idx[perm.to(self.device)]
        draws = self.augmentation(epoch) if augment else None
        for start in range(0, len(idx), self.batch_size):
            b = idx[start:start + self.batch_size].tensor_split(shard[1])[shard[0]]
            x = self.images[b].float().div_(255.0)
            if draws is not None:
                x = self.augment(x, *(d[b] for d in draws))
            if transform is not None:
                x = transform(x)
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            yield x, self.labels[b], b

    def augmentation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (dy, dx, flip) of every sample of the split in ``epoch``."""
        g, n, span = epoch_generator(self.seed, epoch, 1), len(self), 2 * self.crop_padding + 1
        dy = torch.randint(0, span, (n,), generator=g)
        dx = torch.randint(0, span, (n,), generator=g)
        flip = (torch.rand(n, generator=g) < 0.5) & self.hflip
        return dy.to(self.device), dx.to(self.device), flip.to(self.device)

    def augment(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Crop each image at offset (dy, dx) of its zero-padded copy, then flip where ``flip``."""
        n, _, h, w = x.shape
        p = self.crop_padding
        if p > 0:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            rows = (torch.arange(h, device=x.device) + dy[:, None])[:, None, :, None]  # [n, 1, h, 1]
            cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, None, :]  # [n, 1, 1, w]
            batch = torch.arange(n, device=x.device)[:, None, None, None]
            chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, chan, rows, cols]
        return torch.where(flip[:, None, None, None], x.flip(3), x)


def make_loader(data: Prepared, split: str, device: torch.device | str, batch_size: int, **kw) -> BatchLoader:
    """A BatchLoader over ``data``'s split ``split`` ('train', 'val' or 'test'), normalised with the
    data set's statistics."""
    return BatchLoader(getattr(data, split), data.mean, data.std, device, batch_size, **kw)
