"""A photo-like image folder made from Fashion-MNIST: colour JPEGs of varied size and aspect ratio.

    python benchmarks/photo_folder.py --train N --test M --out DIR [--seed S] [--workers W] [--idx-dir D]

Writes DIR/train/<class>/<i>.jpg and DIR/test/<class>/<i>.jpg (the layout of ``data.dataset: image_folder``)
so that the image-folder path can be measured on files that decode like photos, at any count. Each image is
one 28x28 grey item upscaled (bicubic) to a random size (shorter side 140-260 px, aspect ratio 3:4 to 4:3),
painted with two distinct random colours, one for the item and one for the background (colour carries no
label), with a little Gaussian noise, saved at JPEG quality 85-92. Every draw is a function of (seed, split,
i) alone: the same seed gives the same bytes with any number of workers. Asked for more images than the IDX
split holds (60,000 train, 10,000 test), the items are reused cyclically with other draws. Items are taken
one class after the other, so the classes are balanced at any count.

The IDX files are found like data.dataset: fashion_mnist finds them (data/fashion_mnist, data, then Debian's
/usr/share/datasets/fashion-mnist), or in --idx-dir.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import re
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds the packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from kdcompress.data.sources import DEBIAN_FASHION_MNIST, FASHION_CLASSES, find_idx_folder, read_idx_dataset
from kdcompress.types import UserError
from pipeline._common import stage

SHORT_SIDE = (140, 260)  # px, inclusive
MAX_ASPECT = 4 / 3  # width / height drawn log-uniformly in [1 / MAX_ASPECT, MAX_ASPECT]
QUALITY = (85, 92)  # JPEG quality, inclusive
MIN_COLOUR_DISTANCE = 192  # L1 distance between item and background colour (0..765)
NOISE_SIGMA = (2.0, 8.0)  # grey levels
SPLITS = {"train": 0, "test": 1}  # split -> its stream in the per-image seed


def safe_name(name: str) -> str:
    """A class name as a folder name: every run of characters other than letters, digits, '.', '-' and '_'
    becomes one '_' ("T-shirt/top" -> "T-shirt_top")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def find_idx(idx_dir: str | None) -> Path:
    """The folder holding the four Fashion-MNIST IDX files: ``idx_dir`` when given, else the places
    data.dataset: fashion_mnist looks in by default."""
    candidates = [Path(idx_dir)] if idx_dir else [Path("data/fashion_mnist"), Path("data"), DEBIAN_FASHION_MNIST]
    folder = find_idx_folder(candidates)
    if folder is None:
        raise UserError(f"Fashion-MNIST IDX files not found in {', '.join(map(str, candidates))}; allowed: a folder "
                        "with train/t10k images and labels IDX files (.gz or plain), given with --idx-dir, or "
                        "Debian's package (apt-get install dataset-fashion-mnist)")
    return folder


def colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An item colour and a background colour at least MIN_COLOUR_DISTANCE apart (RGB, float)."""
    fg = rng.integers(0, 256, 3)
    while True:
        bg = rng.integers(0, 256, 3)
        if np.abs(fg - bg).sum() >= MIN_COLOUR_DISTANCE:
            return fg.astype(np.float32), bg.astype(np.float32)


def render(item: np.ndarray, rng: np.random.Generator) -> bytes:
    """One grey item (uint8 [h, w], bright on black) as the bytes of a colour JPEG drawn with ``rng``."""
    short = int(rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1))
    aspect = float(np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT))))
    size = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))  # (width, height)
    mask = np.asarray(Image.fromarray(item).resize(size, Image.BICUBIC), dtype=np.float32)[..., None] / 255.0
    fg, bg = colours(rng)
    pixels = bg + (fg - bg) * mask + rng.normal(0.0, rng.uniform(*NOISE_SIGMA), (size[1], size[0], 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), "RGB").save(
        buffer, "JPEG", quality=int(rng.integers(QUALITY[0], QUALITY[1] + 1)))
    return buffer.getvalue()


def write_image(task: tuple[str, np.ndarray, tuple[int, int, int]]) -> int:
    """Render and write one image; ``task`` is (path, item, (seed, split stream, index)). Returns its size."""
    path, item, key = task
    data = render(item, np.random.default_rng(key))
    Path(path).write_bytes(data)
    return len(data)


def class_cycle(labels: np.ndarray) -> np.ndarray:
    """The items' indices taking one item of each class in turn (classes in label order, each class's items in
    file order): any prefix of it is as balanced as the items allow, so every class has images from 10 on."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rank[labels == c] = np.arange((labels == c).sum())
    return np.lexsort((labels, rank))


def tasks(out: Path, split: str, items: np.ndarray, labels: np.ndarray, n: int, classes: list[str], seed: int):
    """What ``write_image`` needs for image i = 0..n-1 of ``split``: item ``class_cycle[i mod len(items)]``,
    under its class."""
    order = class_cycle(labels)
    for i in range(n):
        j = order[i % len(items)]
        yield str(out / split / classes[labels[j]] / f"{i}.jpg"), items[j], (seed, SPLITS[split], i)


def generate(out: Path, counts: dict[str, int], idx_folder: Path, seed: int = 0, workers: int = 1) -> int:
    """Write ``counts[split]`` images of each split under ``out`` (all ten class folders, even empty ones);
    returns the bytes written."""
    raw = read_idx_dataset(idx_folder, FASHION_CLASSES)
    classes = [safe_name(c) for c in raw.classes]
    sources = {"train": (raw.train_images[:, 0].numpy(), raw.train_labels.numpy()),
               "test": (raw.test_images[:, 0].numpy(), raw.test_labels.numpy())}
    for split, n in counts.items():
        for name in classes:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        if n > len(sources[split][0]):
            print(f"note: {split}: {n} images from {len(sources[split][0])} items; items reused cyclically "
                  "with other colours and sizes")
    todo = (t for split, n in counts.items() for t in tasks(out, split, *sources[split], n, classes, seed))
    if workers == 1:
        return sum(map(write_image, todo))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return sum(pool.imap_unordered(write_image, todo, chunksize=32))


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer >= 1")
    return value


@stage
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=positive, required=True, help="training images")
    p.add_argument("--test", type=positive, required=True, help="test images")
    p.add_argument("--out", required=True, help="folder to create (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=positive, default=1, help="processes rendering images")
    p.add_argument("--idx-dir", help="folder with the Fashion-MNIST IDX files (default: where prepare looks)")
    args = p.parse_args(argv)
    out = Path(args.out)
    for name in ("train", "test"):
        if getattr(args, name) < len(FASHION_CLASSES):
            raise UserError(f"--{name} {getattr(args, name)}: fewer images than the {len(FASHION_CLASSES)} classes, "
                            f"and an image folder needs images of every class in both splits; allowed: >= "
                            f"{len(FASHION_CLASSES)}")
    if out.exists():
        raise UserError(f"{out}: already exists; allowed: a path that does not exist yet (remove it to regenerate)")
    idx_folder = find_idx(args.idx_dir)
    partial = out.with_name(out.name + ".partial")  # renamed when complete: an interrupted run leaves no DIR
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    size = generate(partial, {"train": args.train, "test": args.test}, idx_folder, args.seed, args.workers)
    partial.rename(out)
    print(f"wrote {args.train + args.test} images (train {args.train}, test {args.test}) from {idx_folder} to "
          f"{out}: {size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
