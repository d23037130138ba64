"""Data set readers on small files written here in the real on-disk formats (no network)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx
from PIL import Image

from kdcompress.config import DataConfig
from kdcompress.data.sources import READERS, load_source, read_idx
from kdcompress.types import UserError


def cfg(dataset: str, root: Path, **kw) -> DataConfig:
    return DataConfig(dataset=dataset, root=str(root), download=False, **kw)


# --- IDX (MNIST / Fashion-MNIST) ---------------------------------------------------------------

def make_idx_folder(folder: Path, n_train=5, n_test=3, gz_images=True, gz_labels=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / (f"{prefix}-images-idx3-ubyte" + (".gz" if gz_images else "")), images)
        write_idx(folder / (f"{prefix}-labels-idx1-ubyte" + (".gz" if gz_labels else "")), labels)
        out[split] = (images, labels)
    return out


def test_idx_header_written_by_hand_is_read(tmp_path):
    raw = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])  # 2x3 ubyte
    (tmp_path / "m").write_bytes(raw)
    assert read_idx(tmp_path / "m").tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("gz_images,gz_labels", [(True, False), (False, True)])
def test_mnist_idx_roundtrip(tmp_path, gz_images, gz_labels):
    ref = make_idx_folder(tmp_path, gz_images=gz_images, gz_labels=gz_labels)
    raw = load_source(cfg("mnist", tmp_path))
    assert raw.train_images.shape == (5, 1, 28, 28) and raw.test_images.shape == (3, 1, 28, 28)
    assert raw.train_images.dtype == torch.uint8 and raw.train_labels.dtype == torch.int64
    assert np.array_equal(raw.train_images[:, 0].numpy(), ref["train"][0])
    assert np.array_equal(raw.test_images[:, 0].numpy(), ref["test"][0])
    assert raw.train_labels.tolist() == ref["train"][1].tolist()
    assert raw.test_labels.tolist() == ref["test"][1].tolist()
    assert raw.classes == [str(i) for i in range(10)]
    assert raw.source == str(tmp_path)


def test_image_size_resizes_every_data_set(tmp_path):
    ref = make_idx_folder(tmp_path)
    raw = load_source(cfg("fashion_mnist", tmp_path, image_size=56))
    assert raw.train_images.shape == (5, 1, 56, 56) and raw.test_images.shape == (3, 1, 56, 56)
    assert raw.train_images.dtype == torch.uint8
    # doubling then averaging each 2x2 block comes back close to the original 28x28 image
    back = torch.nn.functional.avg_pool2d(raw.test_images.float(), 2)[:, 0].numpy()
    assert np.abs(back - ref["test"][0]).mean() < 40 and np.corrcoef(back.ravel(), ref["test"][0].ravel())[0, 1] > 0.5
    same = load_source(cfg("fashion_mnist", tmp_path))  # null: as stored
    assert same.train_images.shape == (5, 1, 28, 28)


def test_fashion_mnist_torchvision_layout(tmp_path):
    ref = make_idx_folder(tmp_path / "FashionMNIST" / "raw")
    raw = load_source(cfg("fashion_mnist", tmp_path))
    assert raw.classes[0] == "T-shirt/top" and raw.classes[9] == "Ankle boot"
    assert np.array_equal(raw.test_images[:, 0].numpy(), ref["test"][0])
    assert raw.source == str(tmp_path / "FashionMNIST" / "raw")


def test_mnist_missing_names_folders(tmp_path):
    with pytest.raises(UserError) as e:
        load_source(cfg("mnist", tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and str(tmp_path / "MNIST" / "raw") in msg and "data.root" in msg


@pytest.mark.parametrize("raw,why", [
    (bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 1, 2]), "magic"),  # 0x0B = int16, not ubyte
    (bytes([1, 0, 8, 1, 0, 0, 0, 2, 1, 2]), "magic"),
    (bytes([0, 0, 8]), "magic"),
    (bytes([0, 0, 8, 3, 0, 0, 0, 2]), "truncated"),  # declares 3 sizes, holds one
    (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "header says"),  # 5 values declared, 2 present
])
def test_corrupt_idx_header(tmp_path, raw, why):
    (tmp_path / "bad").write_bytes(raw)
    with pytest.raises(UserError, match=why) as e:
        read_idx(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(e.value)


def test_corrupt_gzip_is_a_user_error(tmp_path):
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz")


def test_idx_label_out_of_range(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 12], dtype=np.uint8))
    with pytest.raises(UserError, match="labels range 0..12"):
        load_source(cfg("mnist", tmp_path))


# --- CIFAR (python pickle batches) -------------------------------------------------------------

RED, GREEN, BLUE = 200, 100, 50  # pixel (row 1, col 2) of the first image of each batch


def cifar_rows(n: int, rng) -> np.ndarray:
    """uint8 [n, 3072]: each row is the 32x32 red plane (row-major), then green, then blue."""
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    pos = 1 * 32 + 2
    data[0, pos], data[0, 1024 + pos], data[0, 2048 + pos] = RED, GREEN, BLUE
    return data


def dump(path: Path, obj, protocol: int) -> None:
    data = pickle.dumps(obj, protocol=protocol)
    if protocol == 2:  # name numpy's module as numpy < 2 (and so the real CIFAR files) did
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


def make_cifar10(folder: Path, per_batch=2, n_test=3):
    """Python-2 style files: bytes keys and bytes strings, pickle protocol 2."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for i in range(1, 6):
        data, labels = cifar_rows(per_batch, rng), [int(v) for v in rng.integers(0, 10, per_batch)]
        dump(folder / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
                                           b"data": data, b"filenames": [b"x.png"] * per_batch}, 2)
        batches.append((data, labels))
    test = (cifar_rows(n_test, rng), [9, 0, 3])
    dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test[1], b"data": test[0]}, 2)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(folder / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}, 2)
    return batches, test


def test_cifar10_pickle_batches(tmp_path):
    batches, test = make_cifar10(tmp_path / "cifar-10-batches-py")
    raw = load_source(cfg("cifar10", tmp_path))
    assert raw.train_images.shape == (10, 3, 32, 32) and raw.test_images.shape == (3, 3, 32, 32)
    assert raw.train_images.dtype == torch.uint8 and raw.train_labels.dtype == torch.int64
    # channel planes decoded: image 0 of batch 1, pixel (y=1, x=2) is (R, G, B) = (200, 100, 50)
    assert raw.train_images[0, :, 1, 2].tolist() == [RED, GREEN, BLUE]
    assert raw.train_images[2, :, 1, 2].tolist() == [RED, GREEN, BLUE]  # first image of data_batch_2
    assert raw.test_images[0, :, 1, 2].tolist() == [RED, GREEN, BLUE]
    # every value, element by element: image i, channel c, row y, col x = data[i, c*1024 + y*32 + x]
    d0 = batches[0][0]
    for c, y, x in [(0, 0, 0), (0, 31, 31), (1, 5, 7), (2, 31, 0), (2, 0, 31)]:
        assert raw.train_images[1, c, y, x].item() == d0[1, c * 1024 + y * 32 + x]
    assert raw.train_labels.tolist() == [v for _, labels in batches for v in labels]
    assert raw.test_labels.tolist() == [9, 0, 3]
    assert raw.classes[:3] == ["airplane", "automobile", "bird"] and len(raw.classes) == 10
    assert raw.source == str(tmp_path / "cifar-10-batches-py")


def test_cifar100_pickle_str_keys_root_as_given(tmp_path):
    """Python-3 style files (str keys, newest protocol) placed directly in data.root."""
    rng = np.random.default_rng(2)
    train, test = cifar_rows(4, rng), cifar_rows(2, rng)
    dump(tmp_path / "train", {"data": train, "fine_labels": [0, 99, 5, 42], "coarse_labels": [0, 1, 2, 3]},
         pickle.HIGHEST_PROTOCOL)
    dump(tmp_path / "test", {"data": test, "fine_labels": [7, 8], "coarse_labels": [0, 0]}, pickle.HIGHEST_PROTOCOL)
    names = [f"class{i}" for i in range(100)]
    dump(tmp_path / "meta", {"fine_label_names": names, "coarse_label_names": ["x"] * 20}, pickle.HIGHEST_PROTOCOL)
    raw = load_source(cfg("cifar100", tmp_path))
    assert raw.train_images.shape == (4, 3, 32, 32) and raw.test_images.shape == (2, 3, 32, 32)
    assert raw.train_labels.tolist() == [0, 99, 5, 42] and raw.test_labels.tolist() == [7, 8]
    assert raw.train_images[0, :, 1, 2].tolist() == [RED, GREEN, BLUE]
    assert raw.train_images[3, 2, 10, 20].item() == train[3, 2048 + 10 * 32 + 20]
    assert raw.classes == names and raw.source == str(tmp_path)


@pytest.mark.parametrize("dataset,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_names_folders(tmp_path, dataset, folder):
    with pytest.raises(UserError) as e:
        load_source(cfg(dataset, tmp_path))
    msg = str(e.value)
    assert str(tmp_path / folder) in msg and "cs.toronto.edu" in msg and f"data.dataset={dataset}" in msg


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_with_foreign_object_is_refused(tmp_path):
    make_cifar10(tmp_path)
    dump(tmp_path / "data_batch_3", {b"data": Evil(), b"labels": []}, 2)
    with pytest.raises(UserError, match="data_batch_3.*refusing"):
        load_source(cfg("cifar10", tmp_path))


def test_cifar_bad_batch_shape(tmp_path):
    make_cifar10(tmp_path)
    dump(tmp_path / "test_batch", {b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}, 2)
    with pytest.raises(UserError, match=r"test_batch.*\[N, 3072\]"):
        load_source(cfg("cifar10", tmp_path))


# --- image folder ------------------------------------------------------------------------------

def save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def make_image_folder(root: Path, size=8):
    rng = np.random.default_rng(3)
    cat = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    save(root / "train" / "cat" / "a.png", cat)
    save(root / "train" / "cat" / "b.png", cat[:, ::-1].copy())
    tall = rng.integers(0, 256, (3 * size, size, 3), dtype=np.uint8)  # centre-cropped, not squashed
    save(root / "train" / "cat" / "c.png", tall)
    grey = np.arange(size * size, dtype=np.uint8).reshape(size, size)
    save(root / "train" / "dog" / "g.png", grey)  # mode L
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    save(root / "test" / "cat" / "c.png", cat[::-1].copy())
    save(root / "test" / "dog" / "d.PNG", grey.T.copy())
    return cat, tall, grey


def test_image_folder(tmp_path):
    cat, tall, grey = make_image_folder(tmp_path)
    raw = load_source(cfg("image_folder", tmp_path, image_size=8, crop_fraction=1.0), seed=0)
    assert raw.classes == ["cat", "dog"]
    assert raw.train_images.shape == (3, 3, 8, 8) and raw.test_images.shape == (2, 3, 8, 8)
    assert raw.val_images.shape == (1, 3, 8, 8) and raw.val_labels.tolist() == [0]  # carved from cat, dog has one
    assert raw.train_images.dtype == torch.uint8 and raw.train_labels.dtype == torch.int64
    assert raw.train_labels.tolist() == [0, 0, 1] and raw.test_labels.tolist() == [0, 1]
    cats = [x.permute(1, 2, 0).numpy() for x in [*raw.train_images[:2], raw.val_images[0]]]
    for want in (cat, cat[:, ::-1], tall[8:16]):  # PNG is lossless; the tall one loses its top and bottom
        assert sum(np.array_equal(got, want) for got in cats) == 1
    for c in range(3):  # grey image -> the same values in R, G and B
        assert np.array_equal(raw.train_images[2, c].numpy(), grey)
        assert np.array_equal(raw.test_images[1, c].numpy(), grey.T)
    assert np.array_equal(raw.test_images[0].permute(1, 2, 0).numpy(), cat[::-1])
    assert raw.source == str(tmp_path) and len(raw.mean) == len(raw.std) == 3


def test_image_folder_mismatched_test_classes(tmp_path):
    make_image_folder(tmp_path)
    save(tmp_path / "test" / "bird" / "x.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="not in train: bird"):
        load_source(cfg("image_folder", tmp_path, image_size=8))


def test_image_folder_missing_test_folder(tmp_path):
    save(tmp_path / "train" / "cat" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError) as e:
        load_source(cfg("image_folder", tmp_path, image_size=8))
    assert str(tmp_path / "test") in str(e.value)


def test_image_folder_unreadable_file(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        load_source(cfg("image_folder", tmp_path, image_size=8))


@pytest.mark.parametrize("split", ["train", "test"])
def test_image_folder_empty_class(tmp_path, split):
    make_image_folder(tmp_path)
    save(tmp_path / "train" / "emu" / "e.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "test" / "emu" / "e.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / split / "emu" / "e.png").unlink()
    with pytest.raises(UserError, match=f"{split}/emu: no images"):
        load_source(cfg("image_folder", tmp_path, image_size=8))


# --- registry ----------------------------------------------------------------------------------

def test_registry_and_unknown_dataset(tmp_path):
    assert set(READERS) == {"fashion_mnist", "mnist", "cifar10", "cifar100", "image_folder"}
    with pytest.raises(UserError, match="allowed: cifar10, cifar100, fashion_mnist, image_folder, mnist"):
        load_source(cfg("svhn", tmp_path))
