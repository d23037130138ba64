"""The prepared format, the seeded split and the tensor-resident batch loader."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from conftest import make_split

from kdcompress.data.loader import BatchLoader, make_loader
from kdcompress.data.prepared import Prepared, channel_stats, load_prepared, save_prepared, split_train_val
from kdcompress.data.transforms import Geometry


def test_split_is_seeded_disjoint_and_complete():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    labels = torch.arange(100)
    train, val = split_train_val(images, labels, 0.2, seed=3)
    again, _ = split_train_val(images, labels, 0.2, seed=3)
    other, _ = split_train_val(images, labels, 0.2, seed=4)
    assert len(val) == 20 and len(train) == 80
    assert set(train.labels.tolist()) | set(val.labels.tolist()) == set(range(100))
    assert not set(train.labels.tolist()) & set(val.labels.tolist())
    assert torch.equal(train.labels, again.labels) and not torch.equal(train.labels, other.labels)
    assert torch.equal(train.images.view(-1).long(), train.labels)  # images stay with their labels


def test_save_load_roundtrip(tmp_path):
    s = make_split(20, channels=3)
    mean, std = channel_stats(s.images)
    assert torch.allclose(torch.tensor(mean), s.images.double().div(255).mean((0, 2, 3)).float(), atol=1e-6)
    save_prepared(Prepared(s, s, s, ["a", "b", "c", "d"], mean, std, "here"), tmp_path)
    back = load_prepared(tmp_path)
    assert torch.equal(back.train.images, s.images) and back.train.images.dtype == torch.uint8
    assert back.classes == ["a", "b", "c", "d"] and back.input_shape == [3, 8, 8] and back.source == "here"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_loader_normalises_and_covers_indices_once():
    s = make_split(50)
    loader = BatchLoader(s, [0.5], [0.25], batch_size=16)
    seen, xs = [], []
    for x, y, idx in loader.batches(shuffle=True):
        assert torch.equal(y, s.labels[idx])
        seen += idx.tolist()
        xs.append((x, idx))
    assert sorted(seen) == list(range(50)) and seen != list(range(50))
    x, idx = xs[0]
    assert torch.allclose(x, (s.images[idx].float() / 255 - 0.5) / 0.25)
    assert loader.num_batches() == 4 and loader.num_batches(16) == 1


def test_batch_augmentation_crops_and_flips_per_sample():
    images = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    loader = BatchLoader(make_split(64, size=4), [0.0], [1.0], crop_padding=1, hflip=True)
    out = loader.augment(images.float(), *loader.augmentation(0))
    padded = torch.nn.functional.pad(images.float(), (1, 1, 1, 1))
    candidates = [padded[0, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
    candidates += [c.flip(2) for c in candidates]
    for img in out:  # every output is one of the 18 shifted/flipped crops of the original
        assert any(torch.equal(img, c) for c in candidates)
    assert len({tuple(img.flatten().tolist()) for img in out}) > 6  # and they differ across the batch
    assert out.shape == images.shape


def test_epoch_order_and_augmentation_are_pure_functions_of_seed_epoch_and_sample():
    s = make_split(40, size=6)
    a = BatchLoader(s, [0.5], [0.25], batch_size=8, crop_padding=2, hflip=True, seed=3)
    b = BatchLoader(s, [0.5], [0.25], batch_size=8, crop_padding=2, hflip=True, seed=3)

    def epoch(loader, e, indices=None):
        return {int(i): x for xs, _, idx in loader.batches(indices, shuffle=True, augment=True, epoch=e)
                for i, x in zip(idx, xs)}, [int(i) for _, _, idx in loader.batches(indices, shuffle=True, epoch=e)
                                             for i in idx]

    list(a.batches(shuffle=True, augment=True, epoch=0))  # consuming epoch 0 first changes nothing
    (xa, order_a), (xb, order_b) = epoch(a, 2), epoch(b, 2)
    assert order_a == order_b and all(torch.equal(xa[i], xb[i]) for i in xa)
    x1, order1 = epoch(a, 1)
    assert order1 != order_a and any(not torch.equal(x1[i], xa[i]) for i in xa)
    subset = torch.tensor([3, 7, 11, 30])  # a sample is augmented the same way inside any subset
    xs, _ = epoch(a, 2, subset)
    assert all(torch.equal(xs[i], xa[i]) for i in xs)
    other_seed, _ = epoch(BatchLoader(s, [0.5], [0.25], batch_size=8, crop_padding=2, hflip=True, seed=4), 2)
    assert any(not torch.equal(other_seed[i], xa[i]) for i in xa)


def test_view_shares_the_tensors():
    loader = BatchLoader(make_split(20), [0.5], [0.25], batch_size=8, crop_padding=2, hflip=True, seed=3)
    view = loader.view(5)
    assert view.images.data_ptr() == loader.images.data_ptr() and view.labels.data_ptr() == loader.labels.data_ptr()
    assert view.batch_size == 5 and view.crop_padding == 0 and not view.hflip and view.num_batches() == 4


def test_random_resized_crop_in_memory():
    s = make_split(20, channels=3)
    whole = Geometry(train_transform="random_resized_crop", crop_scale=1.0, crop_ratio=1.0)
    loader = BatchLoader(s, [0.5] * 3, [0.25] * 3, batch_size=8, hflip=True, geometry=whole)
    flips = loader.augmentation(0)[1]
    assert flips.any() and not flips.all()
    for (x, _, idx), (plain, _, _) in zip(loader.batches(augment=True), loader.batches()):  # the whole image
        assert torch.allclose(x, torch.where(flips[idx, None, None, None], plain.flip(3), plain), atol=1e-5)

    crops = BatchLoader(s, [0.5] * 3, [0.25] * 3, batch_size=8, seed=2,
                        geometry=Geometry(train_transform="random_resized_crop", crop_scale=0.2))

    def epoch(e, indices=None):
        return {int(i): x for xs, _, idx in crops.batches(indices, shuffle=True, augment=True, epoch=e)
                for i, x in zip(idx, xs)}

    a, again, other = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(a[i], again[i]) for i in a) and a[0].shape == (3, 8, 8)
    assert any(not torch.allclose(a[i], other[i]) for i in a)
    plain = {int(i): x for xs, _, idx in crops.batches() for i, x in zip(idx, xs)}
    assert any(not torch.allclose(a[i], plain[i]) for i in a)
    subset = epoch(0, torch.tensor([2, 5, 17]))  # a sample is cropped the same way inside any subset
    assert all(torch.equal(subset[i], a[i]) for i in subset)


def test_make_loader_holds_a_memory_split_with_the_data_geometry():
    s = make_split(10, channels=3)
    geometry = Geometry(train_transform="random_resized_crop")
    data = Prepared(s, s, s, ["a", "b", "c", "d"], [0.5] * 3, [0.25] * 3, geometry=geometry)
    loader = make_loader(data, "val", "cpu", 4, workers=2, crop_padding=1, hflip=True, seed=3)
    assert isinstance(loader, BatchLoader) and loader.geometry == geometry and loader.image_shape == (3, 8, 8)
    assert (loader.batch_size, loader.crop_padding, loader.hflip, loader.seed) == (4, 1, True, 3)
    assert loader.view(5).geometry == geometry and loader.view(5).image_shape == (3, 8, 8)
    older = SimpleNamespace(train=s, mean=[0.5] * 3, std=[0.25] * 3)  # prepared data without a geometry
    assert make_loader(older, "train", "cpu", 4).geometry == Geometry()
