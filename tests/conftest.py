"""Shared test helpers: a tiny fake model with the ModelOutput interface and tiny data."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kdcompress.data.loader import BatchLoader
from kdcompress.data.prepared import Split  # noqa: E402
from models.base import Classifier  # noqa: E402

torch.set_num_threads(1)


class FakeNet(Classifier):
    """Three conv stages (stage1..stage3, strides 1/2/2) + pooled embedding + linear head."""

    def __init__(self, num_classes: int = 4, in_channels: int = 1, width: int = 4):
        super().__init__()
        self.stem = nn.Identity()
        self.stages = nn.ModuleDict({
            "stage1": nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU()),
            "stage2": nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU()),
            "stage3": nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.BatchNorm2d(4 * width), nn.ReLU()),
        })
        self.head = nn.Linear(4 * width, num_classes)


def make_split(n: int = 64, num_classes: int = 4, channels: int = 1, size: int = 8, seed: int = 0) -> Split:
    """Random uint8 images whose labels are learnable (class = brightest quadrant)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = torch.randint(0, 60, (n, channels, size, size), generator=g, dtype=torch.uint8)
    h = size // 2
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c % 4, 2)
        images[i, :, r * h:(r + 1) * h, q * h:(q + 1) * h] += 150
    return Split(images, labels)


@pytest.fixture
def fake_net():
    return FakeNet


@pytest.fixture
def tiny_loaders():
    """(train, val) BatchLoaders over tiny learnable data, 1 channel, 8x8, 4 classes."""
    train = BatchLoader(make_split(64, seed=0), [0.5], [0.25], batch_size=16, crop_padding=1, hflip=False)
    val = BatchLoader(make_split(32, seed=1), [0.5], [0.25], batch_size=32)
    return train, val


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian uint32 sizes, then the values."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> None:
    data = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_fashion_idx(folder: Path, n_train: int = 120, n_test: int = 60, size: int = 16) -> Path:
    """A tiny Fashion-MNIST look-alike in the real IDX format (gz), learnable (see make_split)."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        split = make_split(n, num_classes=10, channels=1, size=size, seed=seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", split.images[:, 0].numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", split.labels.numpy())
    return folder


def write_photo_folder(root: Path, per_class: dict[str, int], classes: int = 4, seed: int = 0) -> Path:
    """A tiny image folder of colour photos-like files, ``root/<split>/c<k>/<i>.<ext>`` with
    ``per_class[split]`` images per class: varied sizes and aspect ratios, JPEG and PNG, learnable
    (class = the brightest quadrant, as make_split)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = int(rng.integers(24, 48)), int(rng.integers(24, 48))
                pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
                r, q = divmod(k % 4, 2)
                pixels[r * h // 2:(r + 1) * h // 2, q * w // 2:(q + 1) * w // 2] += np.uint8(150)
                name = folder / f"{i}.{'jpg' if i % 2 else 'png'}"
                Image.fromarray(pixels).save(name, **({"quality": 95} if i % 2 else {}))
    return root


# the params and project folder of the tests that run the real pipeline stages on tiny data
TINY = {
    "base": {"seed": 0, "device": "cpu", "num_threads": 1},
    "data": {"dataset": "fashion_mnist", "root": "raw", "val_fraction": 0.2, "download": False},
    "teacher": {"model": "resnet20", "epochs": 1, "batch_size": 32, "lr": 0.05, "eval_batch_size": 64,
                "precision": "fp32"},  # the same on every host (auto: tests/test_precision.py)
    "distill": {"student": "tinycnn", "method": "kd", "epochs": 2, "batch_size": 32, "lr": 0.05,
                "eval_batch_size": 64},
    "methods": {"kd": {"temperature": 4.0}},
    "benchmark": {"warmup": 2, "runs": 200, "server_batch": 8, "server_runs": 2},
}


def write_params(folder: Path, **overrides) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in {**TINY, **overrides}.items():
        params[section] = {**params.get(section, {}), **values} if isinstance(values, dict) else values
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    write_fashion_idx(tmp_path / "raw")
    write_params(tmp_path)
    return tmp_path
