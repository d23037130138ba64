"""Data set sources: read a raw data set from its usual on-disk format into uint8 tensors.

Each reader returns a ``RawDataset`` (train + test images as uint8 [N, C, H, W], int64 labels,
class names, a description of where it was found). Nothing here downloads unless asked to, and
then only as the last resort.

Formats:

- ``mnist`` / ``fashion_mnist``: the four IDX files (plain or .gz), 1 x 28 x 28.
- ``cifar10`` / ``cifar100``: torchvision's python-pickle batches, 3 x 32 x 32.
- ``image_folder``: ``<root>/train/<class>/*``, ``<root>/test/<class>/*`` (and optionally
  ``<root>/val/<class>/*``) image files, read by ``kdcompress.data.folder``: always RGB,
  centre-cropped to ``data.image_size`` squared (32 when it is null) keeping the aspect ratio.

``load_source`` resizes every other data set to ``data.image_size`` squared too, when it is set
(a 28-px set can feed a 64-px or 224-px torchvision network).
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcompress.config import DataConfig
from kdcompress.data.folder import decode_split, index_image_folder
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
    # a val split of the source's own (an image folder's val/ or per-class carve), and the training split's
    # channel mean/std when the reader computed them; None: carve a val split, compute the statistics
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    mean: list[float] | None = None
    std: list[float] | None = None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) as used by MNIST and Fashion-MNIST.

    Layout: two zero bytes, a type byte (0x08 = unsigned byte, the only one these data sets use),
    the number of dimensions, one big-endian uint32 size per dimension, then the values."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read the IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise UserError(f"{path}: IDX header is truncated or declares {ndim} dimensions")
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
        labels_path = _find_idx(folder, lbl_stem)
        labels = read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
        _check_labels(labels, len(classes), str(labels_path))
        arrays[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return RawDataset(*arrays["train"], *arrays["test"], classes=classes, source=str(folder))


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{where}: labels range {labels.min()}..{labels.max()}, "
                        f"allowed: 0..{num_classes - 1} ({num_classes} classes)")


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
                        f"{hint}put train/t10k images and labels IDX files (.gz or plain) in data.root={cfg.root}"
                        + ("" if cfg.download else " (or set data.download: true with internet access)"))
    return read_idx_dataset(folder, FASHION_CLASSES if fashion else MNIST_CLASSES)


# --- CIFAR-10 / CIFAR-100 (torchvision's python-pickle batches) ---------------------------------

CIFAR = {
    # dataset: (torchvision class, folder, train files, test files, meta file, label key, names key)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names"),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}
CIFAR_SIDE = 32

# The CIFAR batches are pickles. torchvision reads them with a plain pickle.load, which can run
# arbitrary code from a crafted file. We use pickle too (it is the format), but with an unpickler
# that only resolves the globals a pickled numpy array needs, so any other object is refused.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core."):  # pickles written by numpy < 2 (e.g. the real CIFAR files)
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _str(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def load_cifar_pickle(path: Path) -> dict[str, object]:
    """One CIFAR pickle as a dict with str keys. Loaded with ``encoding="bytes"`` like the CIFAR
    authors' own snippet: the original (Python 2) files then have bytes keys, files written by
    Python 3 have str keys; both are accepted."""
    try:
        with open(path, "rb") as f:
            entry = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise UserError(f"{path}: cannot read the CIFAR pickle ({e})") from None
    if not isinstance(entry, dict):
        raise UserError(f"{path}: expected a pickled dict, got {type(entry).__name__}")
    return {_str(k): v for k, v in entry.items()}


def _cifar_field(entry: dict, key: str, path: Path):
    if key not in entry:
        raise UserError(f"{path}: key {key!r} missing; found: {', '.join(sorted(entry))}")
    return entry[key]


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] of one batch file. Each row of ``data`` is
    3072 bytes: the 32x32 red plane (row-major), then green, then blue."""
    entry = load_cifar_pickle(path)
    data = np.asarray(_cifar_field(entry, "data", path))
    labels = np.asarray(_cifar_field(entry, label_key, path))
    side = CIFAR_SIDE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * side * side:
        raise UserError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, {3 * side * side}]")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: {len(data)} images but {label_key!r} holds {labels.shape} {labels.dtype}")
    _check_labels(labels, num_classes, str(path))
    images = torch.from_numpy(data.reshape(-1, 3, side, side).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def find_cifar_folder(candidates: list[Path], files: list[str]) -> Path | None:
    for folder in candidates:
        if all((folder / name).is_file() for name in files):
            return folder
    return None


def load_cifar(cfg: DataConfig) -> RawDataset:
    """CIFAR-10 / CIFAR-100 in torchvision's on-disk format: data.root as given or
    <root>/cifar-10-batches-py (<root>/cifar-100-python), then torchvision's download."""
    tv_name, sub, train_files, test_files, meta_file, label_key, names_key = CIFAR[cfg.dataset]
    root = Path(cfg.root)
    candidates = [root, root / sub]
    files = [*train_files, *test_files, meta_file]
    folder = find_cifar_folder(candidates, files)
    if folder is None and cfg.download:
        try:
            import torchvision

            getattr(torchvision.datasets, tv_name)(str(root), train=True, download=True)
            folder = find_cifar_folder([root / sub], files)
        except Exception:  # noqa: BLE001 - no network is the usual case; the error below says what to do
            folder = None
    if folder is None:
        archive = "cifar-10-python.tar.gz" if cfg.dataset == "cifar10" else "cifar-100-python.tar.gz"
        raise UserError(f"data.dataset={cfg.dataset}: {', '.join(files)} not found in "
                        f"{', '.join(map(str, candidates))}; download {archive} from "
                        f"https://www.cs.toronto.edu/~kriz/cifar.html and unpack it in data.root={cfg.root}"
                        + ("" if cfg.download else " (or set data.download: true with internet access)"))
    meta = load_cifar_pickle(folder / meta_file)
    classes = [_str(n) for n in _cifar_field(meta, names_key, folder / meta_file)]
    splits = []
    for names in (train_files, test_files):
        parts = [read_cifar_batch(folder / name, label_key, len(classes)) for name in names]
        splits += [torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])]
    return RawDataset(*splits, classes=classes, source=str(folder))


# --- image folder ------------------------------------------------------------------------------

def load_image_folder(cfg: DataConfig, seed: int = 0) -> RawDataset:
    """<root>/train/<class>/<image> and <root>/test/<class>/<image> (and <root>/val/<class>/<image>, or
    a val split carved out of train per class with ``seed``), read by ``kdcompress.data.folder``: every
    file checked, then each split decoded into one uint8 [N, 3, S, S] tensor, S = data.image_size (32
    when null), each image RGB and centre-cropped to a square (the aspect ratio is kept, the crop is
    data.crop_fraction of the shorter side). Holds the decoded splits only, never a copy of them."""
    index = index_image_folder(cfg, seed)
    train, val, test = (decode_split(index, split, cfg) for split in ("train", "val", "test"))
    return RawDataset(*train, *test, classes=index.classes, source=str(index.root), val_images=val[0],
                      val_labels=val[1], mean=index.mean, std=index.std)


READERS = {
    "fashion_mnist": load_mnist_like,
    "mnist": load_mnist_like,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "image_folder": load_image_folder,
}


def resize(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """uint8 [N, C, H, W] images resized to ``size`` x ``size`` (bilinear, antialiased when shrinking)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty(len(images), images.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        part = torch.nn.functional.interpolate(part, size=(size, size), mode="bilinear", antialias=True,
                                               align_corners=False)
        out[start:start + chunk] = part.round().clamp_(0, 255).to(torch.uint8)
    return out


def load_source(cfg: DataConfig, seed: int = 0) -> RawDataset:
    """The raw data set of ``data.dataset`` at ``data.image_size``; ``seed`` carves an image folder's val split
    (the other readers have no val split of their own)."""
    if cfg.dataset not in READERS:
        raise UserError(f"data.dataset: {cfg.dataset!r} has no reader; allowed: {', '.join(sorted(READERS))}")
    if READERS[cfg.dataset] is load_image_folder:
        return load_image_folder(cfg, seed)  # decoded at its size already
    raw = READERS[cfg.dataset](cfg)
    if cfg.image_size:
        raw.train_images = resize(raw.train_images, cfg.image_size)
        raw.test_images = resize(raw.test_images, cfg.image_size)
    return raw
