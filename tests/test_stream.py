"""The streaming loader (image files decoded by DataLoader workers) and the photo training transforms."""

from __future__ import annotations

import gc
import math
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from kdcompress.data.loader import BatchLoader, make_loader
from kdcompress.data.prepared import Split
from kdcompress.data.stream import FileSplit, StreamLoader
from kdcompress.data.transforms import (
    Geometry,
    box_in_pixels,
    resized_crop_batch,
    resized_crop_draws,
)
from kdcompress.deploy.predict import read_pixels
from kdcompress.types import UserError

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def write_files(root: Path, n: int = 13, square: bool = False, seed: int = 0) -> FileSplit:
    """``n`` small PNG and JPEG files of varied sizes and aspect ratios (one JPEG large enough that the
    decode takes libjpeg's reduced-size path), some grey, labelled 0..3."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        w, h = (int(rng.integers(10, 30)),) * 2 if square else (int(rng.integers(10, 30)), int(rng.integers(10, 30)))
        if i == 1:
            w, h = (80, 80) if square else (96, 64)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).convert("L") if i % 5 == 3 else Image.fromarray(pixels)
        name = f"c{i % 4}/{i}.{'jpg' if i % 2 else 'png'}"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / name, **({"quality": 90} if i % 2 else {}))
        files.append(name)
    return FileSplit(root, files, torch.arange(n) % 4)


def decoded_split(split: FileSplit, geometry: Geometry, channels: int = 3) -> Split:
    """The same files as a memory split, decoded by the predictor's own read."""
    size = (geometry.size, geometry.size)
    pixels = [read_pixels(split.root / f, channels, size, geometry.crop_fraction) for f in split.files]
    images = torch.from_numpy(np.stack(pixels).reshape(len(pixels), *size, channels)).permute(0, 3, 1, 2)
    return Split(images.contiguous(), split.labels)


def spawned(before: list) -> list:
    """The child processes alive now that were not in ``before``."""
    return [p for p in multiprocessing.active_children() if p not in before]


def collect(loader, **kw) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(loader.batches(**kw))


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


@pytest.mark.parametrize("channels", [3, 1])
def test_stream_equals_memory_for_eval_and_pad_crop_flip(tmp_path, channels):
    split = write_files(tmp_path)
    geometry = Geometry(size=8, crop_fraction=0.875)
    mean, std = MEAN[:channels], STD[:channels]
    kw = dict(batch_size=4, crop_padding=2, hflip=True, seed=5, geometry=geometry)
    memory = BatchLoader(decoded_split(split, geometry, channels), mean, std, **kw)
    stream = StreamLoader(split, mean, std, channels=channels, **kw)
    assert stream.image_shape == memory.image_shape == (channels, 8, 8)
    for args in (dict(), dict(shuffle=True, epoch=2), dict(shuffle=True, augment=True, epoch=3)):
        assert_same(collect(stream, **args), collect(memory, **args))
    x, _, _ = collect(stream, augment=True, epoch=3)[0]
    plain, _, _ = collect(stream)[0]
    assert x.is_contiguous(memory_format=torch.channels_last) and not torch.equal(x, plain)  # it did augment


def test_workers_and_replays_give_the_same_batches(tmp_path):
    split = write_files(tmp_path, n=11)
    geometry = Geometry(size=8, train_transform="random_resized_crop", crop_scale=0.3)
    loaders = [StreamLoader(split, MEAN, STD, batch_size=3, hflip=True, seed=1, geometry=geometry, workers=w)
               for w in (0, 1, 2)]
    args = dict(shuffle=True, augment=True, epoch=4)
    first = collect(loaders[0], **args)
    for loader in loaders[1:]:
        assert_same(collect(loader, **args), first)
    two = loaders[2]
    epoch1 = collect(two, shuffle=True, augment=True, epoch=1)  # the persistent workers serve every epoch
    assert_same(collect(two, **args), first)  # epoch 4 again, after epoch 1: a replay
    half = two.batches(shuffle=True, augment=True, epoch=1)
    next(half)  # a pass left unfinished while another runs
    assert_same(collect(two, **args), first)
    assert_same([next(half) for _ in range(len(epoch1) - 1)], epoch1[1:])
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(epoch1, first))


def test_shuffle_order_and_shards_match_batch_loader(tmp_path):
    split = write_files(tmp_path, n=10)
    geometry = Geometry(size=6)
    stream = StreamLoader(split, MEAN, STD, batch_size=4, seed=9, geometry=geometry)
    memory = BatchLoader(decoded_split(split, geometry), MEAN, STD, batch_size=4, seed=9)
    subset = torch.tensor([9, 0, 4, 7, 2, 5, 8])
    for epoch in (0, 1):
        for indices in (None, subset):
            order = [i for _, _, idx in stream.batches(indices, shuffle=True, epoch=epoch) for i in idx.tolist()]
            assert order == [i for _, _, idx in memory.batches(indices, shuffle=True, epoch=epoch) for i in idx]
    full = collect(stream, shuffle=True, epoch=1)
    parts = [collect(stream, shuffle=True, epoch=1, shard=(rank, 3)) for rank in range(3)]
    for b, pieces in enumerate(zip(*parts)):
        for k in range(3):
            assert torch.equal(torch.cat([p[k] for p in pieces]), full[b][k])
    last = [p[-1][0] for p in parts]  # the last global batch has 2 samples: rank 2 gets an empty part
    assert [len(x) for x in last] == [1, 1, 0] and last[2].shape == (0, 3, 6, 6)


def test_resized_crop_draws_are_reproducible_and_within_bounds():
    scale, ratio, n = 0.2, 1.5, 4000
    boxes, flip = resized_crop_draws(3, 7, n, scale, ratio, hflip=True)
    again, flip_again = resized_crop_draws(3, 7, n, scale, ratio, hflip=True)
    other, _ = resized_crop_draws(3, 8, n, scale, ratio, hflip=True)
    assert torch.equal(boxes, again) and torch.equal(flip, flip_again) and not torch.equal(boxes, other)
    assert 0.4 < flip.float().mean() < 0.6 and not resized_crop_draws(3, 7, n, scale, ratio, hflip=False)[1].any()
    assert (boxes >= 0).all() and (boxes <= 1 + 1e-12).all()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    free = (w < 1) & (h < 1)  # not clamped
    assert free.float().mean() > 0.6
    aspect, area = w[free] / h[free], w[free] * h[free]
    assert aspect.min() >= 1 / ratio - 1e-9 and aspect.max() <= ratio + 1e-9
    assert area.min() >= scale - 1e-9 and area.max() <= 1
    assert aspect.min() < 1 / ratio + 0.02 and aspect.max() > ratio - 0.02 and area.min() < scale + 0.01
    clamped = ~free  # a clamped side spans the whole image
    assert torch.all((w[clamped] == 1) | (h[clamped] == 1))

    for width, height in ((40, 30), (24, 36)):  # in a non-square image's pixels: the drawn area and aspect
        px = box_in_pixels(boxes, width, height)
        pw, ph = px[:, 2] - px[:, 0], px[:, 3] - px[:, 1]
        assert (px[:, :2] >= 0).all() and (px[:, 2] <= width + 1e-9).all() and (px[:, 3] <= height + 1e-9).all()
        ok = free & (pw < width) & (ph < height)
        assert ok.float().mean() > 0.3
        assert torch.allclose(pw[ok] / ph[ok], w[ok] / h[ok]) and torch.allclose(pw[ok] * ph[ok] / (width * height),
                                                                                     w[ok] * h[ok])
    assert torch.allclose(box_in_pixels(boxes, 24, 24), boxes * 24)  # square: the fractions as they are


def test_resized_crop_batch_full_box_is_identity_and_boxes_crop():
    x = torch.rand(3, 2, 8, 8)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    none, every = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    assert torch.allclose(resized_crop_batch(x, full, none, 8), x, atol=1e-5)
    assert torch.allclose(resized_crop_batch(x, full, every, 8), x.flip(3), atol=1e-5)
    quarter = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.5, 0.0, 1.0, 0.5]])
    out = resized_crop_batch(x, quarter, torch.tensor([False, False, True]), 4)
    expected = torch.stack([x[0, :, :4, :4], x[1, :, 4:, 4:], x[2, :, :4, 4:].flip(2)])
    assert out.shape == (3, 2, 4, 4) and torch.allclose(out, expected, atol=1e-5)


def test_random_resized_crop_streamed(tmp_path):
    split = write_files(tmp_path, n=8, square=True)
    whole = Geometry(size=8, train_transform="random_resized_crop", crop_scale=1.0, crop_ratio=1.0)
    loader = StreamLoader(split, MEAN, STD, batch_size=8, hflip=True, geometry=whole)
    (x, _, idx), = collect(loader, augment=True)
    (plain, _, _), = collect(loader)
    flips = loader.augmentation(0)[1][idx]  # the whole square image: its evaluation pixels, flipped where drawn
    assert flips.any() and torch.equal(x, torch.where(flips[:, None, None, None], plain.flip(3), plain))
    crops = StreamLoader(split, MEAN, STD, batch_size=8,
                         geometry=Geometry(size=8, train_transform="random_resized_crop"))
    a, b, c = (collect(crops, augment=True, epoch=e) for e in (0, 0, 1))
    assert_same(a, b)
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][0], plain)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_gone_after_prepare_is_one_line_naming_it(tmp_path, workers):
    split = write_files(tmp_path, n=6)
    loader = StreamLoader(split, MEAN, STD, batch_size=2, geometry=Geometry(size=8), workers=workers)
    before = multiprocessing.active_children()
    assert len(collect(loader)) == 3
    (tmp_path / split.files[3]).unlink()
    (tmp_path / split.files[4]).write_bytes(b"not an image any more")
    with pytest.raises(UserError) as err:
        collect(loader, indices=torch.tensor([3]))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / split.files[3]) in message and "rerun the prepare" in message
    assert "no such file" in message and not spawned(before)  # the failed pass's workers were stopped
    with pytest.raises(UserError, match=r"4\.png: not an image .*rerun the prepare stage$"):
        collect(loader, indices=torch.tensor([4]))


def test_workers_persist_across_passes_and_stop_cleanly(tmp_path):
    split = write_files(tmp_path, n=4)
    loader = StreamLoader(split, MEAN, STD, batch_size=2, geometry=Geometry(size=6), workers=2)
    before = multiprocessing.active_children()
    collect(loader)
    workers = spawned(before)
    collect(loader, shuffle=True, epoch=1)
    assert len(workers) == 2 and spawned(before) == workers  # not re-spawned
    loader.close()
    assert [w.exitcode for w in workers] == [0, 0]  # joined, not killed
    assert len(collect(loader)) == 2  # a pass after close starts new workers
    cyclic = StreamLoader(split, MEAN, STD, batch_size=2, geometry=Geometry(size=6), workers=1)
    cyclic.itself = cyclic  # collected only by the garbage collector
    collect(cyclic)
    workers = spawned(before)
    del loader, cyclic
    gc.collect()
    assert len(workers) == 3 and [w.exitcode for w in workers] == [0, 0, 0]


def test_make_loader_picks_the_storage(tmp_path):
    files = write_files(tmp_path, n=4)
    geometry = Geometry(size=6, crop_fraction=0.5)
    data = SimpleNamespace(train=files, val=decoded_split(files, geometry), mean=MEAN, std=STD, geometry=geometry,
                           input_shape=[3, 6, 6])
    stream = make_loader(data, "train", "cpu", 2, workers=1, crop_padding=1, hflip=True, seed=4)
    assert isinstance(stream, StreamLoader) and stream.workers == 1 and stream.geometry == geometry
    assert (stream.channels, stream.crop_padding, stream.hflip, stream.seed) == (3, 1, True, 4)
    memory = make_loader(data, "val", "cpu", 2)
    assert isinstance(memory, BatchLoader) and memory.geometry == geometry
    assert_same(collect(stream), collect(memory))
    view = stream.view(3)
    assert isinstance(view, StreamLoader) and view.batch_size == 3 and view.crop_padding == 0 and not view.hflip
    assert view.num_batches() == math.ceil(4 / 3) and view.geometry == geometry and view.image_shape == (3, 6, 6)
