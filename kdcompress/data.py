"""The prepared on-disk format and the tensor-resident batch loader.

``prepare`` writes one ``{split}.pt`` per split (uint8 images [N, C, H, W] + int64 labels) and a
``meta.json`` (class names, channel mean/std, input shape, source). Training reads the tensors
into memory once and batches by indexing; augmentation runs on whole batches.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcompress.io import atomic_write
from kdcompress.types import UserError

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Prepared:
    train: Split
    val: Split
    test: Split
    classes: list[str]
    mean: list[float]
    std: list[float]
    source: str = ""

    @property
    def input_shape(self) -> list[int]:
        return list(self.train.images.shape[1:])


def split_train_val(images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Carve a seeded random validation split out of the training set."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(labels) * val_fraction))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return Split(images[train], labels[train]), Split(images[val], labels[val])


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.to(torch.float64) / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return mean.tolist(), std.tolist()


def save_prepared(data: Prepared, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        split = getattr(data, name)
        atomic_write(out / f"{name}.pt", lambda f, s=split: torch.save({"images": s.images, "labels": s.labels}, f))
    meta = {"classes": data.classes, "mean": data.mean, "std": data.std, "input_shape": data.input_shape,
            "source": data.source, "sizes": {n: len(getattr(data, n)) for n in SPLITS}}
    atomic_write(out / "meta.json", json.dumps(meta, indent=2), text=True)


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"prepared data not found: {path} (run the prepare stage first)")
    try:
        meta = json.loads(path.read_text())
        meta["classes"], meta["mean"], meta["std"], meta["input_shape"]  # noqa: B018 - the keys readers need
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: corrupt prepared metadata ({type(err).__name__}: {err}); "
                        "rerun the prepare stage") from None
    return meta


def load_prepared(data_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> Prepared:
    meta = load_meta(data_dir)
    parts = {}
    for name in SPLITS:
        if name in splits:
            path = Path(data_dir) / f"{name}.pt"
            try:
                blob = torch.load(path, weights_only=True)
                parts[name] = Split(blob["images"], blob["labels"])
            except Exception as err:  # noqa: BLE001 - a truncated zip, a bad pickle, a missing key, ...
                reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                raise UserError(f"{path}: not a readable prepared split ({reason}); "
                                "rerun the prepare stage") from None
        else:
            parts[name] = Split(torch.empty(0, *meta["input_shape"], dtype=torch.uint8),
                                torch.empty(0, dtype=torch.long))
    return Prepared(**parts, classes=meta["classes"], mean=meta["mean"], std=meta["std"], source=meta["source"])


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
