"""Batches decoded on the fly from image files, for splits too large to hold in memory.

A ``FileSplit`` (a split of the prepared stream storage) lists image files, relative to a root
folder, and their labels. A ``StreamLoader`` has the interface and the semantics of the in-memory
``BatchLoader``: the same shuffle order, shards and normalisation, and every random choice drawn in
the main process per (seed, epoch, sample) (``kdcompress.data.transforms``), so its batches do not
depend on the number of DataLoader workers that decode the files, and any epoch can be replayed alone
(resume). Each file goes through ``predict.decode_image``, the one decode of the project, and is
evaluated on exactly the pixels ``predict.py`` feeds the exported model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcompress.data.prepared import FileSplit
from kdcompress.data.transforms import (
    BatchSource,
    Geometry,
    box_in_pixels,
    epoch_batches,
    pad_crop,
    pad_crop_draws,
    resized_crop_draws,
)
from kdcompress.deploy.predict import ImageError, decode_image, read_pixels
from kdcompress.types import UserError

__all__ = ["FileSplit", "StreamLoader"]

PREFETCH_BATCHES = 4  # per worker, when the batches go to a CUDA device


class DecodeFailed(UserError):
    """A file of a split failed to decode after prepare had read it."""


def _one_line(err: DecodeFailed) -> str:
    """The message a worker raised: DataLoader re-raises a worker's exception with the worker's whole
    traceback as its message, whose last line is "<module>.DecodeFailed: <message>"."""
    last = str(err).rstrip().splitlines()[-1]
    return last.removeprefix(f"{DecodeFailed.__module__}.{DecodeFailed.__qualname__}: ")


class _Decode(torch.utils.data.Dataset):
    """Decodes one task (sample index, that sample's draw or None) into uint8 [C, S, S]."""

    def __init__(self, split: FileSplit, channels: int, geometry: Geometry, padding: int):
        self.root, self.files = Path(split.root), split.files
        self.channels, self.geometry, self.padding = channels, geometry, padding

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, task: tuple[int, tuple | None]) -> torch.Tensor:
        index, draw = task
        path, g, s = self.root / self.files[index], self.geometry, self.geometry.size
        try:
            if draw is not None and g.train_transform == "random_resized_crop":
                pixels = self.resized_crop(path, *draw)
            else:
                pixels = read_pixels(path, self.channels, (s, s), g.crop_fraction)
        except ImageError as e:
            raise DecodeFailed(f"{path}: {e}; the file changed after prepare read it: rerun the prepare "
                               "stage") from None
        x = torch.from_numpy(pixels.reshape(s, s, self.channels).transpose(2, 0, 1).copy())  # Pillow: read-only
        if draw is not None and g.train_transform == "pad_crop_flip":
            dy, dx, flip = (torch.tensor([d]) for d in draw)
            x = pad_crop(x[None], dy, dx, flip, self.padding)[0]
        return x

    def resized_crop(self, path: Path, box: list[float], flip: bool) -> np.ndarray:
        """The drawn box (fractions) in the decoded image's pixels, resized to S x S, flipped if drawn."""
        img = decode_image(path, self.channels, self.geometry.decode_side)
        pixel_box = box_in_pixels(torch.tensor(box, dtype=torch.float64), img.width, img.height).tolist()
        img = img.resize((self.geometry.size,) * 2, Image.Resampling.BILINEAR, box=tuple(pixel_box))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(img, dtype=np.uint8)


class _Plan(torch.utils.data.Sampler):
    """The batch sampler: one pass over the batches (lists of tasks) set before each pass, so a
    DataLoader with persistent workers serves every epoch."""

    def __init__(self):
        self.batches: Iterator[list] = iter(())

    def __iter__(self) -> Iterator[list]:
        return self.batches


def _tasks(b: torch.Tensor, draws: tuple[torch.Tensor, ...] | None) -> list[tuple[int, tuple | None]]:
    """The DataLoader tasks of batch ``b``: (sample index, that sample's draw as plain Python or None)."""
    if draws is None:
        return [(i, None) for i in b.tolist()]
    return list(zip(b.tolist(), zip(*(d[b].tolist() for d in draws))))


def _stop(decoded: Iterator[torch.Tensor]) -> None:
    """Stop the workers of a DataLoader iterator (torch's own shutdown; a no-op without workers)."""
    getattr(decoded, "_shutdown_workers", lambda: None)()


def _shutdown(loader: torch.utils.data.DataLoader) -> None:
    """Stop a DataLoader's persistent workers, if it started them."""
    if getattr(loader, "_iterator", None) is not None:
        _stop(loader._iterator)


class StreamLoader(BatchSource):
    """Batches of (x, y, index) decoded from the files of ``split`` by ``workers`` DataLoader worker
    processes (0: in the main process), with the interface and semantics of ``BatchLoader``.

    ``x`` is float, normalised with ``mean``/``std``, channels_last, on ``device``: each file's
    evaluation pixels (``predict.read_pixels`` at ``geometry.size``, ``geometry.crop_fraction``); with
    ``augment``, "pad_crop_flip" applies BatchLoader's crop and flip to them, "random_resized_crop"
    resizes a random box of the decoded image to ``geometry.size`` (Pillow bilinear), flipped with
    ``hflip``. ``transform`` maps the float [0, 1] batch in the main process before normalisation.
    """

    def __init__(self, split: FileSplit, mean: list[float], std: list[float], device: torch.device | str = "cpu",
                 batch_size: int = 128, crop_padding: int = 0, hflip: bool = False, seed: int = 0,
                 geometry: Geometry = Geometry(), channels: int = 3, workers: int = 0):
        if geometry.size <= 0:
            raise ValueError("a streamed split needs geometry.size, the side its images are decoded to")
        if len(split.files) != len(split.labels):
            raise ValueError(f"{len(split.files)} files but {len(split.labels)} labels")
        super().__init__(split.labels, mean, std, device, batch_size, crop_padding, hflip, seed, geometry)
        self.split = split
        self.channels = channels
        self.workers = workers
        self._persistent: tuple[torch.utils.data.DataLoader, _Plan, weakref.finalize] | None = None
        self._busy = False  # a pass of the persistent DataLoader is in progress

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every ``x`` this loader yields."""
        return self.channels, self.geometry.size, self.geometry.size

    def view(self, batch_size: int) -> StreamLoader:
        """A loader over the same files, un-augmented, with its own batch size (and its own workers)."""
        return StreamLoader(self.split, self.mean.flatten().tolist(), self.std.flatten().tolist(), self.device,
                            batch_size=batch_size, seed=self.seed, geometry=self.geometry, channels=self.channels,
                            workers=self.workers)

    def batches(self, indices: torch.Tensor | None = None, shuffle: bool = False, augment: bool = False,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None, epoch: int = 0,
                shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``shard=(rank, world)``: this rank's part of every batch (contiguous, near-equal parts of the
        same global batches in every rank). A file that no longer decodes raises UserError naming it."""
        draws = self.augmentation(epoch) if augment else None
        parts = list(epoch_batches(len(self), indices, self.batch_size, shuffle, self.seed, epoch, shard, "cpu"))
        loader, plan, persistent = self._dataloader()
        plan.batches = (_tasks(b, draws) for b in parts if len(b))
        decoded = None
        try:
            decoded = iter(loader)
            for b in parts:
                x = next(decoded) if len(b) else torch.empty(0, *self.image_shape, dtype=torch.uint8)
                x = x.to(self.device, non_blocking=True).float().div_(255.0)
                if transform is not None:
                    x = transform(x)
                x = self.normalise(x)
                b = b.to(self.device)
                yield x, self.labels[b], b
        except DecodeFailed as e:
            if persistent:
                self.close()  # now, see close()
            else:
                _stop(decoded)
            raise UserError(_one_line(e)) from None
        finally:
            plan.batches = iter(())
            if persistent:
                self._busy = False

    def close(self) -> None:
        """Stop the worker processes now; a later pass starts new ones. They also stop when the loader
        is collected, or at exit: not left to the DataLoader iterator's own ``__del__``, which, when the
        garbage collector takes it in a reference cycle (a traceback's), can run after its queues were
        finalised and then waits 5 s for every worker before killing it."""
        if self._persistent is not None:
            self._persistent[2]()
            self._persistent = None

    def augmentation(self, epoch: int) -> tuple[torch.Tensor, ...]:
        """Per-sample draws of every sample of the split in ``epoch`` (CPU): (dy, dx, flip) for
        pad_crop_flip, (boxes as fractions [n, 4], flip) for random_resized_crop."""
        g = self.geometry
        if g.train_transform == "random_resized_crop":
            return resized_crop_draws(self.seed, epoch, len(self), g.crop_scale, g.crop_ratio, self.hflip)
        return pad_crop_draws(self.seed, epoch, len(self), self.crop_padding, self.hflip)

    def _dataloader(self) -> tuple[torch.utils.data.DataLoader, _Plan, bool]:
        """A DataLoader for one pass, its plan, and whether it is the loader's persistent one (its
        workers live across epochs) rather than a one-off (no workers, or the persistent one is busy
        with a pass not finished yet)."""
        if self._busy or self.workers == 0:
            return *self._new_dataloader(persistent=False), False
        if self._persistent is None:
            loader, plan = self._new_dataloader(persistent=True)
            self._persistent = loader, plan, weakref.finalize(self, _shutdown, loader)
        self._busy = True
        return *self._persistent[:2], True

    def _new_dataloader(self, persistent: bool) -> tuple[torch.utils.data.DataLoader, _Plan]:
        plan, cuda = _Plan(), self.device.type == "cuda"
        dataset = _Decode(self.split, self.channels, self.geometry, self.crop_padding)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan, num_workers=self.workers,
                                             persistent_workers=persistent, pin_memory=cuda,
                                             prefetch_factor=PREFETCH_BATCHES if cuda and self.workers else None)
        return loader, plan
