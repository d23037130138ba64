"""The prepared on-disk format, in one of two storages.

- memory: one ``{split}.pt`` per split (uint8 images [N, C, H, W] + int64 labels). Training reads
  the tensors into memory (on the device) once, batches by indexing and augments whole batches.
- stream: one ``{split}.csv`` index per split (paths relative to the image folder, labels, sizes and
  content hashes, so DVC sees a changed photo), never the pixels; DataLoader workers decode the files.

Both write a ``meta.json``: class names, channel mean/std, input shape, source, storage and the
geometry (output size, evaluation crop, training transform).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kdcompress.data.transforms import Geometry
from kdcompress.io import atomic_write, file_sha
from kdcompress.types import UserError

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FileSplit:
    """A split of the stream storage: image files (paths relative to ``root``) and their labels."""

    root: Path
    files: list[str]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Prepared:
    train: Split | FileSplit
    val: Split | FileSplit
    test: Split | FileSplit
    classes: list[str]
    mean: list[float]
    std: list[float]
    source: str = ""
    geometry: Geometry = Geometry()
    shape: list[int] | None = None  # [C, H, W]; None: that of the stored training images

    @property
    def input_shape(self) -> list[int]:
        return list(self.shape) if self.shape is not None else list(self.train.images.shape[1:])

    @property
    def storage(self) -> str:
        return "stream" if isinstance(self.train, FileSplit) else "memory"


def split_train_val(images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Carve a seeded random validation split out of the training set."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(labels) * val_fraction))
    val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
    return Split(images[train], labels[train]), Split(images[val], labels[val])


def channel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and (sample) std of uint8 images [N, C, H, W] in [0, 1], accumulated in float64
    over chunks of images: no float copy of the whole split."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square_().sum(dim=(0, 2, 3))
    count = images.numel() // max(1, images.shape[1])
    return stats_from_sums(total.tolist(), squares.tolist(), count)


def stats_from_sums(total: list[float], squares: list[float], count: int) -> tuple[list[float], list[float]]:
    """Mean and sample std (clamped at 1e-6) per channel from float64 sums of x and of x^2 over ``count`` values."""
    mean = [t / count for t in total]
    var = [max(0.0, (q - count * m * m) / max(1, count - 1)) for q, m in zip(squares, mean)]
    return mean, [max(v ** 0.5, 1e-6) for v in var]


def save_prepared(data: Prepared, out_dir: str | Path, **extra) -> None:
    """The memory storage's split tensors and the meta.json of either storage (the stream storage's
    index files are written before, by ``folder.write_index``); ``extra``: more meta.json keys."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data.storage == "memory":
        for name in SPLITS:
            split = getattr(data, name)
            atomic_write(out / f"{name}.pt", lambda f, s=split: torch.save({"images": s.images, "labels": s.labels}, f))
    meta = {"classes": data.classes, "mean": data.mean, "std": data.std, "input_shape": data.input_shape,
            "source": data.source, "sizes": {n: len(getattr(data, n)) for n in SPLITS}, "storage": data.storage,
            "geometry": data.geometry.as_dict(), **extra}
    if data.storage == "stream":
        meta["root"] = str(data.train.root)
    atomic_write(out / "meta.json", json.dumps(meta, indent=2), text=True)


def train_sha(data_dir: str | Path) -> str:
    """The sha of the prepared training split's file: its images (memory) or its index of paths, labels
    and content hashes (stream)."""
    meta = load_meta(data_dir)
    return file_sha(Path(data_dir) / ("train.csv" if meta.get("storage") == "stream" else "train.pt"))


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
    """The prepared splits named in ``splits`` (the others empty), in the storage prepare chose."""
    meta = load_meta(data_dir)
    try:
        geometry = Geometry(**meta.get("geometry", {}))
    except (TypeError, ValueError) as err:
        raise UserError(f"{Path(data_dir) / 'meta.json'}: corrupt geometry ({err}); rerun the prepare stage") from None
    if meta.get("storage") == "stream":
        from kdcompress.data.folder import read_index

        parts = {name: FileSplit(Path(meta["root"]), *read_index(data_dir, name)) if name in splits
                 else FileSplit(Path(meta["root"]), [], torch.empty(0, dtype=torch.long)) for name in SPLITS}
        return Prepared(**parts, classes=meta["classes"], mean=meta["mean"], std=meta["std"], source=meta["source"],
                        geometry=geometry, shape=meta["input_shape"])
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
    return Prepared(**parts, classes=meta["classes"], mean=meta["mean"], std=meta["std"], source=meta["source"],
                    geometry=geometry, shape=meta["input_shape"])


