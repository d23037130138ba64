"""The image-folder reader (kdcompress/data/folder.py) on small photo files generated here."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdcompress.config import DataConfig
from kdcompress.data.folder import decode_split, index_image_folder, read_index, write_index
from kdcompress.data.sources import load_source
from kdcompress.deploy import predict
from kdcompress.types import UserError

S = 16


def cfg(root: Path, **kw) -> DataConfig:
    kw = {"image_size": S, "crop_fraction": 1.0, "workers": 0, **kw}
    return DataConfig(dataset="image_folder", root=str(root), **kw)


def save(path: Path, img: Image.Image | np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path, **kw)
    return path


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root: Path, counts: dict[str, int], splits=("train", "test"), seed=0) -> None:
    """``counts[class]`` random RGB PNGs of assorted sizes per class in each split."""
    k = seed
    for split in splits:
        for name, n in counts.items():
            for i in range(n):
                k += 1
                save(root / split / name / f"{i:02d}.png", noise(S + k % 7, S + k % 5, seed=k))


def rotated_jpeg(path: Path) -> Path:
    """A 32 x 16 (W x H) JPEG, left half dark, right half bright, whose EXIF says orientation 6 (shown turned
    90 degrees clockwise: the dark half on top)."""
    array = np.full((16, 32, 3), 230, np.uint8)
    array[:, :16] = 20
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(path, array, exif=exif.tobytes(), quality=95)


def photo_forms(folder: Path) -> dict[str, np.ndarray | None]:
    """Files in every photo form -> the evaluation pixels worked out here (None: checked otherwise)."""
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (S, S, 4), dtype=np.uint8)
    grey16 = rng.integers(0, 256, (S, S)).astype(np.uint16) * 257
    grey = rng.integers(0, 256, (S, S), dtype=np.uint8)
    palette = Image.fromarray(noise(S, S, seed=8)).quantize(8)
    palette.info["transparency"] = 0
    save(folder / "rgba.png", Image.fromarray(rgba, "RGBA"))
    save(folder / "grey16.png", Image.fromarray(grey16))
    save(folder / "grey.png", Image.fromarray(grey, "L"))
    save(folder / "palette.gif", palette, transparency=0)
    save(folder / "cmyk.jpg", Image.fromarray(noise(S, S, seed=9)).convert("CMYK"), quality=95)
    rotated_jpeg(folder / "rotated.jpg")
    return {"rgba.png": rgba[..., :3], "grey16.png": np.repeat((grey16 // 257).astype(np.uint8)[..., None], 3, 2),
            "grey.png": np.repeat(grey[..., None], 3, 2), "palette.gif": np.asarray(palette.convert("RGB")),
            "cmyk.jpg": None, "rotated.jpg": None}


def test_photo_forms_same_pixels_in_prepare_and_predictor(tmp_path):
    """Prepare's path (index + decode_split) and the predictor's (read_pixels) give the same pixels for
    every photo form, and those are the pixels the form should give."""
    expected = photo_forms(tmp_path / "train" / "a")
    make_folder(tmp_path, {"b": 2})
    make_folder(tmp_path, {"a": 1}, splits=("test",))
    for name in expected:
        save(tmp_path / "val" / "a" / name, Image.open(tmp_path / "train" / "a" / name))  # not re-read: a copy
    make_folder(tmp_path, {"b": 1}, splits=("val",))
    index = index_image_folder(cfg(tmp_path), seed=0)
    assert index.val_from == "folder"
    images, labels = decode_split(index, "train", cfg(tmp_path))
    paths = [e.path for e in index.splits["train"]]
    assert len(paths) == len(expected) + 2 and labels.tolist() == [e.label for e in index.splits["train"]]
    for path, chw in zip(paths, images):
        pixels = chw.permute(1, 2, 0).numpy()
        assert np.array_equal(pixels, predict.read_pixels(tmp_path / path, 3, (S, S), 1.0)), path
        want = expected.get(Path(path).name)
        if want is not None:
            assert np.array_equal(pixels, want), path
    by_name = {Path(p).name: chw.permute(1, 2, 0).numpy().astype(int) for p, chw in zip(paths, images)}
    with Image.open(tmp_path / "train" / "a" / "cmyk.jpg") as cmyk:
        assert cmyk.mode == "CMYK"
        assert np.abs(by_name["cmyk.jpg"] - np.asarray(cmyk.convert("RGB"), int)).max() == 0
    assert np.abs(by_name["cmyk.jpg"] - noise(S, S, seed=9).astype(int)).mean() < 12  # the colours survived
    rotated = by_name["rotated.jpg"]  # 16 x 32 after the turn; the centre 16 x 16 of it: dark above, bright below
    assert rotated[:8].max() < 60 and rotated[8:].min() > 190


def test_aspect_ratio_kept_centre_crop(tmp_path):
    """A wide image and a tall one are centre-cropped to the square of their shorter side (not squashed),
    and crop_fraction takes that part of the shorter side; worked out by hand on the arrays."""
    wide, tall, square = noise(S, 3 * S, seed=1), noise(3 * S, S, seed=2), noise(2 * S, 2 * S, seed=3)
    save(tmp_path / "train" / "a" / "wide.png", wide)
    save(tmp_path / "train" / "a" / "tall.png", tall)
    save(tmp_path / "test" / "a" / "square.png", square)
    index = index_image_folder(cfg(tmp_path, val_fraction=0.5), seed=0)
    got = {}
    for split in ("train", "val"):
        images, _ = decode_split(index, split, cfg(tmp_path))
        got.update({Path(e.path).name: x.permute(1, 2, 0).numpy() for e, x in zip(index.splits[split], images)})
    assert np.array_equal(got["wide.png"], wide[:, S:2 * S])
    assert np.array_equal(got["tall.png"], tall[S:2 * S])
    half = cfg(tmp_path, crop_fraction=0.5)  # 32 x 32: the centre 16 x 16
    images, _ = decode_split(index_image_folder(half, seed=0), "test", half)
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), square[S // 2:S // 2 + S, S // 2:S // 2 + S])


def big_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height but whose data is a few bytes (nothing big is allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def write_bad(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = path.with_name("source.jpeg.bin")
    Image.fromarray(noise(40, 60)).save(jpeg, format="JPEG")
    data = jpeg.read_bytes()
    jpeg.unlink()
    content = {"corrupt": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "truncated": data[:len(data) // 2],
               "empty": b"", "text": b"just some notes, not a picture\n"}
    if kind == "huge":
        big_png(path, 20000, 20000)
    else:
        path.write_bytes(content[kind])


BAD = {"corrupt": ("corrupt.jpg", "not an image"), "truncated": ("truncated.jpg", "truncated"),
       "empty": ("empty.jpg", "empty file"), "text": ("notes.jpg", "not an image"),
       "huge": ("huge.png", "exceeds limit|over the limit")}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_file_is_one_line_error_naming_it(tmp_path, kind):
    make_folder(tmp_path, {"a": 3, "b": 2})
    name, reason = BAD[kind]
    write_bad(tmp_path / "test" / "b" / name, kind)
    with pytest.raises(UserError, match=reason) as err:
        index_image_folder(cfg(tmp_path), seed=0)
    message = str(err.value)
    assert str(tmp_path / "test" / "b" / name) in message and "\n" not in message and "skip_bad" in message


def test_skip_bad_skips_and_lists_the_files(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 2})
    for kind in BAD:
        write_bad(tmp_path / "train" / "a" / BAD[kind][0], kind)
    write_bad(tmp_path / "test" / "b" / "empty.jpg", "empty")
    with pytest.raises(UserError, match="5 more unreadable files"):
        index_image_folder(cfg(tmp_path, workers=2), seed=0)
    index = index_image_folder(cfg(tmp_path, skip_bad=True, workers=2), seed=0)
    assert sorted(p for p, _ in index.skipped) == sorted(
        [f"train/a/{BAD[k][0]}" for k in BAD] + ["test/b/empty.jpg"])
    assert all(reason for _, reason in index.skipped)
    kept = [e.path for split in index.splits.values() for e in split]
    assert len(kept) == 10 and not any(p.endswith((".jpg", "huge.png")) for p in kept)


def test_skip_bad_still_needs_a_training_image_per_class(tmp_path):
    make_folder(tmp_path, {"a": 2}, splits=("test",))
    make_folder(tmp_path, {"a": 2}, splits=("train",))
    write_bad(tmp_path / "train" / "b" / "notes.jpg", "text")
    save(tmp_path / "test" / "b" / "x.png", noise(S, S))
    with pytest.raises(UserError, match="no readable training image") as err:
        index_image_folder(cfg(tmp_path, skip_bad=True), seed=0)
    assert str(tmp_path / "train" / "b") in str(err.value)


@pytest.mark.parametrize("case,match", [
    ("empty_train_class", r"train/c: no images"), ("empty_test_class", r"test/c: no images"),
    ("empty_val_class", r"val/c: no images"), ("missing_in_test", "missing in test: c"),
    ("missing_in_val", "missing in val: c"), ("extra_in_test", "not in train: d"), ("extra_in_val", "not in train: d"),
    ("no_train", "train: folder not found"), ("no_test", "test: folder not found"),
])
def test_folder_structure_errors(tmp_path, case, match):
    """Structural problems fail even with skip_bad, in one line naming the folder."""
    make_folder(tmp_path, {"a": 2, "b": 2, "c": 2}, splits=("train", "val", "test"))
    what = case.rpartition("_in_")[2]  # the split of missing_in_X / extra_in_X
    if case.startswith("empty_"):
        folder = tmp_path / case.split("_")[1] / "c"
        for f in folder.iterdir():
            f.unlink()
        (folder / "readme.txt").write_text("no pictures here")
    elif case.startswith("missing_in_"):
        for f in (tmp_path / what / "c").iterdir():
            f.unlink()
        (tmp_path / what / "c").rmdir()
    elif case.startswith("extra_in_"):
        save(tmp_path / what / "d" / "x.png", noise(S, S))
    else:
        shutil.rmtree(tmp_path / case[len("no_"):])
    with pytest.raises(UserError, match=match) as err:
        index_image_folder(cfg(tmp_path, skip_bad=True), seed=0)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_stratified_val_carve_is_seeded_and_keeps_every_class(tmp_path):
    make_folder(tmp_path, {"few": 2, "some": 5, "many": 10}, splits=("train",))
    make_folder(tmp_path, {"few": 1, "some": 1, "many": 1}, splits=("test",))
    cfg_ = cfg(tmp_path, val_fraction=0.2)
    first, again, other = (index_image_folder(cfg_, seed) for seed in (0, 0, 1))
    assert first.val_from == "carved" and first.classes == ["few", "many", "some"]
    val_counts = np.bincount([e.label for e in first.splits["val"]], minlength=3).tolist()
    assert val_counts == [1, 2, 1]  # max(1, round(2 * 0.2)), round(10 * 0.2), round(5 * 0.2)
    train, val = ([e.path for e in first.splits[s]] for s in ("train", "val"))
    assert train == sorted(train) and val == sorted(val) and not set(train) & set(val)
    assert sorted(train + val) == sorted(f"train/{p.parent.name}/{p.name}" for p in (tmp_path / "train").rglob("*.png"))
    assert [e.path for e in again.splits["val"]] == val
    assert [e.path for e in other.splits["val"]] != val


def test_val_folder_is_used_as_given(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 2}, splits=("train", "val", "test"))
    index = index_image_folder(cfg(tmp_path, val_fraction=0.5), seed=0)
    assert index.val_from == "folder"
    for split, n in (("train", 5), ("val", 5), ("test", 5)):
        entries = index.splits[split]
        assert len(entries) == n and all(e.path.startswith(f"{split}/") for e in entries)
        assert [e.label for e in entries] == [0, 0, 0, 1, 1]


def test_entries_hashes_and_channel_stats(tmp_path):
    """Each entry's bytes and sha256 are its file's; mean/std equal a direct float64 computation over the
    training split's evaluation pixels (decoded by the default 0.875 centre crop, in a pool of 2)."""
    make_folder(tmp_path, {"a": 4, "b": 3})
    cfg_ = cfg(tmp_path, crop_fraction=None, workers=2)
    index = index_image_folder(cfg_, seed=3)
    for entry in (e for split in index.splits.values() for e in split):
        data = (tmp_path / entry.path).read_bytes()
        assert entry.bytes == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    images, _ = decode_split(index, "train", cfg_)
    x = images.to(torch.float64) / 255
    np.testing.assert_allclose(index.mean, x.mean(dim=(0, 2, 3)).tolist(), rtol=1e-12)
    np.testing.assert_allclose(index.std, x.std(dim=(0, 2, 3)).tolist(), rtol=1e-10)
    assert len(images) == len(index.splits["train"]) == 5  # 4 + 3, one of each carved off


def traced_peak(fn):
    """fn()'s result and the peak of Python-allocated memory (numpy arrays included) while it ran."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_decode_split_fills_one_tensor(tmp_path):
    """decode_split allocates the split's tensor once: its numpy temporaries do not grow with the number
    of images (tracemalloc; a list of decoded arrays would), and torch allocates the one tensor, not a
    second whole-split copy (the profiler sees torch's allocations)."""
    from torch.profiler import ProfilerActivity, profile

    n, few, size = 120, 30, 32
    for i in range(n):
        save(tmp_path / "train" / "a" / f"{i:03d}.png", noise(48, 40, seed=i))
    save(tmp_path / "test" / "a" / "x.png", noise(40, 40))
    cfg_ = cfg(tmp_path, image_size=size, val_fraction=0.01)
    index = index_image_folder(cfg_, seed=0)
    small = dataclasses.replace(index, splits={**index.splits, "train": index.splits["train"][:few]})
    (images, labels), peak = traced_peak(lambda: decode_split(index, "train", cfg_))
    _, peak_few = traced_peak(lambda: decode_split(small, "train", cfg_))
    image = 3 * size * size
    assert images.shape == (n - 1, 3, size, size) and images.is_contiguous() and len(labels) == n - 1
    assert peak - peak_few < (n - 1 - few) * image / 4, (peak, peak_few)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        again, _ = decode_split(index, "train", cfg_)
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    assert torch.equal(again, images) and images.nbytes <= allocated < 1.25 * images.nbytes, allocated
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(),
                          predict.read_pixels(tmp_path / index.splits["train"][0].path, 3, (size, size), 1.0))


def test_index_files_round_trip_and_errors(tmp_path):
    make_folder(tmp_path / "data", {"a": 2, "b,c": 2})  # a comma in a class name
    index = index_image_folder(cfg(tmp_path / "data"), seed=0)
    write_index(index, tmp_path / "out")
    for split in ("train", "val", "test"):
        paths, labels = read_index(tmp_path / "out", split)
        assert paths == [e.path for e in index.splits[split]] and labels.dtype == torch.int64
        assert labels.tolist() == [e.label for e in index.splits[split]]
    assert (tmp_path / "out" / "train.csv").read_text().splitlines()[0] == "path,label,bytes,sha256"
    with pytest.raises(UserError, match="not found; rerun the prepare stage"):
        read_index(tmp_path / "nowhere", "train")
    (tmp_path / "out" / "val.csv").write_text("path,label,bytes,sha256\ntrain/a/x.png,cat,1,ab\n")
    with pytest.raises(UserError, match=r"val.csv: corrupt image index .*line 2.*rerun the prepare stage"):
        read_index(tmp_path / "out", "val")
    (tmp_path / "out" / "test.csv").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(UserError, match="test.csv: corrupt image index"):
        read_index(tmp_path / "out", "test")


def test_load_source_memory_mode(tmp_path):
    """load_source gives the decoded splits with the folder's own val split and statistics."""
    make_folder(tmp_path, {"a": 3, "b": 2})
    raw = load_source(cfg(tmp_path), seed=5)
    index = index_image_folder(cfg(tmp_path), seed=5)
    for split in ("train", "val", "test"):
        images = getattr(raw, f"{split}_images")
        labels = getattr(raw, f"{split}_labels")
        want_images, want_labels = decode_split(index, split, cfg(tmp_path))
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    assert raw.classes == ["a", "b"] and raw.mean == index.mean and raw.std == index.std
    assert raw.source == str(tmp_path) and len(raw.val_labels) == 2 and len(raw.train_labels) == 3
