"""How stored pixels become training and evaluation inputs: the geometry recorded in the prepared
data's meta.json (output size, the evaluation's centre crop, the training transform), and the
per-sample random draws of each training transform, pure functions of (seed, epoch, sample)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Geometry:
    size: int = 0  # output side in px; 0: as stored (the built-in data sets without data.image_size)
    crop_fraction: float = 1.0  # evaluation: resize the shorter side to size / f, centre-crop size
    train_transform: str = "pad_crop_flip"  # pad_crop_flip | random_resized_crop
    crop_scale: float = 0.08  # random_resized_crop: smallest area fraction
    crop_ratio: float = 4 / 3  # random_resized_crop: aspect ratios in [1/r, r]

    def as_dict(self) -> dict:
        return asdict(self)
