"""The prepared on-disk format and the tensor-resident batch loader.

``prepare`` writes one ``{split}.pt`` per split (uint8 images [N, C, H, W] + int64 labels) and a
``meta.json`` (class names, channel mean/std, input shape, source). Training reads the tensors
into memory once and batches by indexing; augmentation runs on whole batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


