"""Data set sources: read a raw data set from its usual on-disk format into uint8 tensors.

Each reader returns a ``RawDataset`` (train + test images as uint8 [N, C, H, W], int64 labels,
class names, a description of where it was found). Nothing here downloads unless asked to, and
then only as the last resort.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcompress.config import DataConfig
from kdcompress.types import UserError

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class RawDataset:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    source: str


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) as used by MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path}: IDX header says {shape} but the file holds {body.size} values")
    return body.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None


def find_idx_folder(candidates: list[Path]) -> Path | None:
    """First folder holding all four IDX files (plain or .gz)."""
    for folder in candidates:
        if all(_find_idx(folder, stem) for pair in IDX_FILES.values() for stem in pair):
            return folder
    return None


def read_idx_dataset(folder: Path, classes: list[str]) -> RawDataset:
    arrays = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        images = read_idx(_find_idx(folder, img_stem))
        labels = read_idx(_find_idx(folder, lbl_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
        arrays[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return RawDataset(*arrays["train"], *arrays["test"], classes=classes, source=str(folder))


def load_mnist_like(cfg: DataConfig) -> RawDataset:
    """MNIST / Fashion-MNIST: data.root (as given, or torchvision's <root>/<Name>/raw layout),
    then Debian's package folder (Fashion-MNIST), then torchvision's download."""
    fashion = cfg.dataset == "fashion_mnist"
    tv_name = "FashionMNIST" if fashion else "MNIST"
    root = Path(cfg.root)
    candidates = [root, root / tv_name / "raw", root / cfg.dataset]
    if fashion:
        candidates.append(DEBIAN_FASHION_MNIST)
    folder = find_idx_folder(candidates)
    if folder is None and cfg.download:
        try:
            import torchvision

            getattr(torchvision.datasets, tv_name)(str(root), train=True, download=True)
            getattr(torchvision.datasets, tv_name)(str(root), train=False, download=True)
            folder = find_idx_folder([root / tv_name / "raw"])
        except Exception:  # noqa: BLE001 - no network is the usual case; the error below says what to do
            folder = None
    if folder is None:
        hint = ("install Debian's package: apt-get install dataset-fashion-mnist, or " if fashion else "")
        raise UserError(f"data.dataset={cfg.dataset}: IDX files not found in {', '.join(map(str, candidates))}; "
                        f"{hint}put train/t10k images and labels IDX files (.gz or plain) in data.root={cfg.root}")
    return read_idx_dataset(folder, FASHION_CLASSES if fashion else MNIST_CLASSES)


READERS = {
    "fashion_mnist": load_mnist_like,
    "mnist": load_mnist_like,
}


def load_source(cfg: DataConfig) -> RawDataset:
    if cfg.dataset not in READERS:
        raise UserError(f"data.dataset: {cfg.dataset!r} has no reader; allowed: {', '.join(sorted(READERS))}")
    return READERS[cfg.dataset](cfg)
