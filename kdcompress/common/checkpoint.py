"""Checkpoints: a plain dict (architecture name, shapes, state_dict, info), loaded with
``weights_only=True``. ``load_weights`` turns shape mismatches into one clear error line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from kdcompress.io import atomic_write
from kdcompress.types import UserError


def save_checkpoint(path: str | Path, arch: str, num_classes: int, in_channels: int, state_dict: dict,
                    **info) -> Path:
    blob = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels,
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "info": info}
    return atomic_write(path, lambda f: torch.save(blob, f))


def read_checkpoint(path: str | Path) -> dict:
    """Our checkpoint dict; a bare state_dict (a user's own weights) comes back as
    ``{"state_dict": ...}`` without architecture fields."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise UserError(f"{path}: not a loadable PyTorch checkpoint ({str(err).splitlines()[0][:200]})") from None
    if isinstance(blob, dict) and "state_dict" in blob:
        return blob
    if isinstance(blob, dict) and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return {"state_dict": blob}
    raise UserError(f"{path}: expected a state_dict or a kdcompress checkpoint, got {type(blob).__name__}")


def load_weights(model: torch.nn.Module, state_dict: dict, source: str | Path) -> torch.nn.Module:
    """Load ``state_dict`` into ``model`` strictly; any missing, unexpected or mis-shaped tensor
    is reported in one line naming the first offending key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if wrong:
        k = wrong[0]
        raise UserError(f"{source}: shape mismatch for {k}: checkpoint {tuple(state_dict[k].shape)}, "
                        f"model {tuple(own[k].shape)} ({len(wrong)} tensors differ; wrong architecture or classes?)")
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"{source}: checkpoint does not fit the model: {what} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    model.load_state_dict(state_dict)
    return model


def build_model(create_model: Callable[[str, int, int], torch.nn.Module], arch: str, num_classes: int,
                in_channels: int) -> torch.nn.Module:
    """A fresh model from the registry ``create_model`` (models.create_model); an unknown name is a
    one-line UserError."""
    try:
        return create_model(arch, num_classes, in_channels)
    except ValueError as err:
        raise UserError(str(err)) from None


def load_model(path: str | Path, device: torch.device, create_model: Callable[[str, int, int], torch.nn.Module],
               data=None) -> torch.nn.Module:
    """A model rebuilt from one of our checkpoints, in eval mode, channels_last; with ``data`` (a
    Prepared split set) its classes and input channels must match the data's."""
    ckpt = read_checkpoint(path)
    if "arch" not in ckpt:
        raise UserError(f"{path}: not a kdcompress checkpoint (no architecture recorded)")
    if data is not None and (ckpt["num_classes"], ckpt["in_channels"]) != (len(data.classes), data.input_shape[0]):
        raise UserError(f"{path}: the model takes {ckpt['in_channels']}-channel images and predicts "
                        f"{ckpt['num_classes']} classes; the data has {data.input_shape[0]} channels and "
                        f"{len(data.classes)} classes")
    model = build_model(create_model, ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"])
    load_weights(model, ckpt["state_dict"], path)
    return model.to(device, memory_format=torch.channels_last).eval()
