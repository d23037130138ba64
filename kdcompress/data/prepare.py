"""The prepare stage as one function: read the raw data set, choose the storage (memory or stream),
take or carve the val split, compute the channel statistics and write the prepared splits with
their meta.json (kdcompress.data.prepared)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kdcompress.config import DataConfig
from kdcompress.data.folder import decode_split, eval_geometry, index_image_folder, write_index
from kdcompress.data.prepared import SPLITS, FileSplit, Prepared, Split, channel_stats, save_prepared, split_train_val
from kdcompress.data.sources import load_source
from kdcompress.data.transforms import Geometry
from kdcompress.types import UserError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # RGB, what pretrained nets expect


def geometry_for(cfg: DataConfig) -> Geometry:
    """Output size, evaluation crop and training transform. The built-in data sets are square and keep
    their whole image (crop 1.0); photos get ImageNet's centre crop unless data.crop_fraction says."""
    if cfg.dataset == "image_folder":
        size, fraction = eval_geometry(cfg)
    elif cfg.crop_fraction not in (None, 1.0):
        raise UserError(f"data.crop_fraction: {cfg.crop_fraction} crops photos (data.dataset: image_folder); "
                        f"{cfg.dataset} is resized whole; allowed here: null or 1.0")
    else:
        size, fraction = cfg.image_size or 0, 1.0
    return Geometry(size=size, crop_fraction=fraction, train_transform=cfg.train_transform,
                    crop_scale=cfg.crop_scale, crop_ratio=cfg.crop_ratio)


def normalisation(cfg: DataConfig, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """The training split's own statistics, or ImageNet's (data.normalize: imagenet) for pretrained nets."""
    if cfg.normalize == "dataset":
        return mean, std
    if len(mean) != 3:
        raise UserError(f"data.normalize: imagenet is for RGB images; {cfg.dataset} has {len(mean)} channel(s); "
                        "allowed: dataset")
    return IMAGENET_MEAN, IMAGENET_STD


def prepare(cfg: DataConfig, seed: int, out: str | Path) -> dict:
    """Write the prepared data to ``out``; returns the prepare metrics (storage, split sizes, skipped files)."""
    geometry = geometry_for(cfg)
    skipped: list[tuple[str, str]] = []
    if cfg.dataset == "image_folder":
        index = index_image_folder(cfg, seed)
        skipped = index.skipped
        decoded_gb = sum(map(len, index.splits.values())) * 3 * geometry.size ** 2 / 1e9
        storage = cfg.storage if cfg.storage != "auto" else "memory" if decoded_gb <= cfg.memory_budget_gb else "stream"
        if storage == "stream":
            write_index(index, out)
            splits = {n: FileSplit(Path(cfg.root), [e.path for e in index.splits[n]],
                                   torch.tensor([e.label for e in index.splits[n]], dtype=torch.long)) for n in SPLITS}
        else:
            splits = {n: Split(*decode_split(index, n, cfg)) for n in SPLITS}
        mean, std = normalisation(cfg, index.mean, index.std)
        data = Prepared(**splits, classes=index.classes, mean=mean, std=std, source=str(index.root),
                        geometry=geometry, shape=[3, geometry.size, geometry.size])
    else:
        if cfg.storage == "stream":
            raise UserError(f"data.storage: stream reads image files (data.dataset: image_folder); {cfg.dataset} is "
                            "read into memory whole; allowed here: auto, memory")
        raw = load_source(cfg)
        train, val = split_train_val(raw.train_images, raw.train_labels, cfg.val_fraction, seed)
        raw.train_images = None  # the splits are copies: do not hold the source's tensor beside them
        mean, std = normalisation(cfg, *channel_stats(train.images))
        data = Prepared(train, val, Split(raw.test_images, raw.test_labels), raw.classes, mean, std, raw.source,
                        geometry=geometry)
        decoded_gb = sum(getattr(data, n).images.numel() for n in SPLITS) / 1e9
    save_prepared(data, out, skipped=len(skipped))
    source = os.path.abspath(data.source)
    if not source.startswith(os.path.abspath("data") + os.sep):
        print(f"note: read {data.source}, which is outside data/: `dvc repro` will not notice when it changes")
    if skipped:
        print(f"skipped {len(skipped)} unreadable image files (data.skip_bad: true), first: "
              f"{skipped[0][0]}: {skipped[0][1]}")
    return {"storage": data.storage, "decoded_gb": round(decoded_gb, 4), "skipped": len(skipped),
            **{n: len(getattr(data, n)) for n in SPLITS}}
