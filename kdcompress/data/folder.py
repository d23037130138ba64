"""Image folders of real photos, at any size: an index of the files and the memory storage's decode.

Layout: ``<root>/train/<class>/<image>`` and ``<root>/test/<class>/<image>``, optionally with
``<root>/val/<class>/<image>``; without val/, a validation split is carved out of train per class.
Class names are train's sorted subfolders; an image is a file with one of the predictor's extensions.

Every file is read through the predictor's one decode and evaluation crop (``predict.read_pixels``:
EXIF orientation, 16-bit, palette, CMYK, the bomb limit, the aspect-keeping centre crop), so prepare,
training, evaluation and the deployed predictor see the same pixels. ``index_image_folder`` checks
every file that way (in a pool of ``data.workers`` processes), hashes it and sums the training split's
channel statistics, keeping no pixels; ``decode_split`` decodes one split into one uint8 tensor.
"""

from __future__ import annotations

import csv
import hashlib
import io
import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcompress.config import DataConfig
from kdcompress.data.prepared import stats_from_sums
from kdcompress.deploy import predict
from kdcompress.io import atomic_write
from kdcompress.types import UserError

IMAGE_FOLDER_SIZE = 32  # px, when data.image_size is null
PHOTO_CROP = 0.875  # ImageNet's evaluation crop, when data.crop_fraction is null
INDEX_COLUMNS = ["path", "label", "bytes", "sha256"]
EXTENSIONS = ", ".join(sorted(predict.IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class Entry:
    """One image file of a split: its path relative to the data root, its label, size and content hash."""

    path: str
    label: int
    bytes: int
    sha256: str


@dataclass
class FolderIndex:
    """The checked files of an image folder, by split ("train", "val", "test"), and the training split's
    per-channel mean and std of its evaluation pixels / 255."""

    root: Path
    classes: list[str]
    splits: dict[str, list[Entry]]
    mean: list[float]
    std: list[float]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), with data.skip_bad
    val_from: str = "carved"  # "folder": <root>/val as given; "carved": out of train, per class


def eval_geometry(cfg: DataConfig) -> tuple[int, float]:
    """The output side S (images are S x S) and the evaluation crop fraction of an image folder."""
    return cfg.image_size or IMAGE_FOLDER_SIZE, cfg.crop_fraction or PHOTO_CROP


def _pixels(source, size: int, fraction: float) -> np.ndarray:
    """uint8 [size, size, 3] evaluation pixels of one file (a path or a binary file object)."""
    return predict.read_pixels(source, 3, (size, size), fraction)


# --- listing -----------------------------------------------------------------------------------

def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[str]:
    return sorted(p.name for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in predict.IMAGE_EXTENSIONS)


def _list_split(root: Path, split: str, classes: list[str]) -> list[list[str]]:
    """Per class (in label order), the split's image paths relative to ``root``; a class folder that is
    missing, extra or without images is an error."""
    found = _class_dirs(root / split)
    missing, extra = [c for c in classes if c not in found], [c for c in found if c not in classes]
    if missing or extra:
        raise UserError(f"{root / split}: class folders differ from {root / 'train'}"
                        + (f"; missing in {split}: {', '.join(missing)}" if missing else "")
                        + (f"; not in train: {', '.join(extra)}" if extra else ""))
    per_class = []
    for name in classes:
        files = _image_files(root / split / name)
        if not files:
            raise UserError(f"{root / split / name}: no images (allowed extensions: {EXTENSIONS})")
        per_class.append([f"{split}/{name}/{file}" for file in files])
    return per_class


def _list_folder(root: Path, cfg: DataConfig) -> tuple[list[str], dict[str, list[list[str]]]]:
    """Class names and, per split present on disk, the per-class image paths."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UserError(f"{root / split}: folder not found; expected {root}/train/<class>/<image> and "
                            f"{root}/test/<class>/<image>, optionally {root}/val/<class>/<image> "
                            f"(data.root: {cfg.root})")
    classes = _class_dirs(root / "train")
    if not classes:
        raise UserError(f"{root / 'train'}: no class subfolders; expected {root}/train/<class>/<image>")
    splits = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    return classes, {split: _list_split(root, split, classes) for split in splits}


def carve_val(per_class: list[list[str]], fraction: float, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """(train, val) per class: a seeded permutation of each class's files (SeedSequence([seed, label])),
    round(n * fraction) of them to val, at least 1 when the class has 2 or more, never all."""
    train, val = [], []
    for label, files in enumerate(per_class):
        n = len(files)
        n_val = min(n - 1, max(1, round(n * fraction))) if n >= 2 else 0
        order = np.random.default_rng(np.random.SeedSequence([seed, label])).permutation(n)
        val.append(sorted(files[i] for i in order[:n_val]))
        train.append(sorted(files[i] for i in order[n_val:]))
    return train, val


# --- the worker pool ---------------------------------------------------------------------------

def _pool_map(fn: Callable, tasks: list, workers: int) -> Iterator:
    """``map(fn, tasks)`` in order, in a pool of ``workers`` processes (0 or 1: in this process)."""
    if workers <= 1 or len(tasks) < 2:
        yield from map(fn, tasks)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    chunksize = max(1, min(64, len(tasks) // (4 * workers)))
    with multiprocessing.get_context(method).Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(fn, tasks, chunksize)


def _check_file(task: tuple[str, int, float, bool]) -> tuple[int, str, np.ndarray | None, str | None]:
    """(bytes, sha256, float64 [2, 3] channel sums of x and x^2 for x = pixels / 255 or None, error or None)
    of one file, decoded once as the evaluation would decode it."""
    path, size, fraction, want_sums = task
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return 0, "", None, f"cannot read the file ({e.strerror or type(e).__name__})"
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return 0, sha, None, "empty file (0 bytes)"
    try:
        pixels = _pixels(io.BytesIO(data), size, fraction)
    except predict.ImageError as e:
        return len(data), sha, None, str(e)
    if not want_sums:
        return len(data), sha, None, None
    x = pixels.reshape(-1, 3).astype(np.float64) / 255.0
    return len(data), sha, np.stack([x.sum(axis=0), np.square(x).sum(axis=0)]), None


def _decode_file(task: tuple[str, int, float]) -> tuple[np.ndarray | None, str | None]:
    path, size, fraction = task
    try:
        return _pixels(path, size, fraction), None
    except predict.ImageError as e:
        return None, str(e)


# --- the index ---------------------------------------------------------------------------------

def index_image_folder(cfg: DataConfig, seed: int) -> FolderIndex:
    """List, check and hash every image of the folder at ``data.root``; take val/ as given or carve it
    out of train per class; sum the training split's channel statistics. An unreadable file is an error
    naming it, or (``data.skip_bad``) skipped and listed; a class left without a training image is an
    error either way. Nothing is written."""
    root = Path(cfg.root)
    classes, listed = _list_folder(root, cfg)
    val_from = "folder" if "val" in listed else "carved"
    if val_from == "carved":
        listed["train"], listed["val"] = carve_val(listed["train"], cfg.val_fraction, seed)
    size, fraction = eval_geometry(cfg)
    files = [(split, path, label) for split in ("train", "val", "test")
             for path, label in sorted((p, lbl) for lbl, paths in enumerate(listed[split]) for p in paths)]
    tasks = [(str(root / path), size, fraction, split == "train") for split, path, _ in files]
    splits: dict[str, list[Entry]] = {"train": [], "val": [], "test": []}
    bad, sums = [], np.zeros((2, 3))
    for (split, path, label), (nbytes, sha, part, error) in zip(files, _pool_map(_check_file, tasks, cfg.workers)):
        if error is not None:
            bad.append((path, error))
            continue
        splits[split].append(Entry(path, label, nbytes, sha))
        if part is not None:
            sums += part
    _check_bad(root, bad, cfg.skip_bad)
    _check_train_classes(root, classes, splits["train"], len(bad))
    mean, std = stats_from_sums(sums[0].tolist(), sums[1].tolist(), len(splits["train"]) * size * size)
    return FolderIndex(root, classes, splits, mean, std, bad if cfg.skip_bad else [], val_from)


def _check_bad(root: Path, bad: list[tuple[str, str]], skip_bad: bool) -> None:
    if bad and not skip_bad:
        path, reason = bad[0]
        more = f"; {len(bad) - 1} more unreadable files" if len(bad) > 1 else ""
        raise UserError(f"{root / path}: {reason}{more}; fix or remove it, or set data.skip_bad: true to skip "
                        "unreadable images")


def _check_train_classes(root: Path, classes: list[str], train: list[Entry], skipped: int) -> None:
    present = {e.label for e in train}
    for label, name in enumerate(classes):
        if label not in present:
            raise UserError(f"{root / 'train' / name}: no readable training image left after skipping {skipped} "
                            "unreadable files (data.skip_bad); every class needs at least one")


# --- the index on disk -------------------------------------------------------------------------

def write_index(index: FolderIndex, out_dir: str | Path) -> None:
    """One ``{split}.csv`` per split in ``out_dir`` (columns path, label, bytes, sha256), written atomically."""
    for split, entries in index.splits.items():
        def write(f, entries=entries):
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            rows = csv.writer(text, lineterminator="\n")
            rows.writerow(INDEX_COLUMNS)
            rows.writerows((e.path, e.label, e.bytes, e.sha256) for e in entries)
            text.flush()
            text.detach()  # the file object stays open for atomic_write
        atomic_write(Path(out_dir) / f"{split}.csv", write)


def read_index(out_dir: str | Path, split: str) -> tuple[list[str], torch.Tensor]:
    """The paths (relative to the data root) and int64 labels of a split's index file."""
    path = Path(out_dir) / f"{split}.csv"
    paths, labels = [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header != INDEX_COLUMNS:
                raise ValueError(f"header {header}, expected {','.join(INDEX_COLUMNS)}")
            for row in rows:
                if len(row) != len(INDEX_COLUMNS) or not row[1].isdigit():
                    raise ValueError(f"line {rows.line_num}: {row!r} is not path,label,bytes,sha256")
                paths.append(row[0])
                labels.append(int(row[1]))
    except FileNotFoundError:
        raise UserError(f"{path}: image index not found; rerun the prepare stage") from None
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        raise UserError(f"{path}: corrupt image index ({e}); rerun the prepare stage") from None
    return paths, torch.tensor(labels, dtype=torch.int64)


# --- the memory storage ------------------------------------------------------------------------

def decode_split(index: FolderIndex, split: str, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, S, S] and labels int64 [N] of one split of ``index``: each file's evaluation
    pixels written straight into its slot of one preallocated tensor (no list of images, no copy of
    the whole split)."""
    size, fraction = eval_geometry(cfg)
    entries = index.splits[split]
    images = torch.empty((len(entries), 3, size, size), dtype=torch.uint8)
    tasks = [(str(index.root / e.path), size, fraction) for e in entries]
    for i, (pixels, error) in enumerate(_pool_map(_decode_file, tasks, cfg.workers)):
        if error is not None:
            raise UserError(f"{tasks[i][0]}: {error} (changed since it was indexed? rerun the prepare stage)")
        np.copyto(images[i].numpy().transpose(1, 2, 0), pixels)  # HWC pixels into the CHW slot
    return images, torch.tensor([e.label for e in entries], dtype=torch.int64)
