"""Checkpoints: a plain dict (architecture name, shapes, state_dict, info), loaded with
``weights_only=True``. ``load_weights`` uses a file as is (``teacher.checkpoint``); ``init_weights``
starts a model from one to train it (``teacher.init``, ``distill.student_init``), leaving a
classifier for other classes as initialised. Both turn a mismatch into one clear error line."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kdcompress.io import atomic_write
from kdcompress.types import UserError


def save_checkpoint(path: str | Path, arch: str, num_classes: int, in_channels: int, state_dict: dict,
                    **info) -> Path:
    blob = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels,
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "info": info}
    return atomic_write(path, lambda f: torch.save(blob, f))


WRAPPERS = ("state_dict", "model")  # where training scripts keep the weights: ours and timm's, torchvision's references
OURS = ("arch", "num_classes", "in_channels")  # the fields that make a file one of our checkpoints
DDP_PREFIX = "module."  # what DistributedDataParallel adds to every key of a state_dict saved through it


def read_checkpoint(path: str | Path) -> dict:
    """Our checkpoint dict; any other weights file (a bare state_dict, or one under ``state_dict`` or
    ``model`` as timm's and torchvision's training scripts save them) comes back as
    ``{"state_dict": ...}`` without architecture fields. A ``module.`` prefix on every key is dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the arguments training scripts save too
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise UserError(f"{path}: not a loadable PyTorch checkpoint ({str(err).splitlines()[0][:200]})") from None
    key = next((k for k in WRAPPERS if isinstance(blob, dict) and isinstance(blob.get(k), dict)), None)
    state = blob[key] if key else blob
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict (names -> tensors), bare or under 'state_dict' or 'model', "
                        f"or a kdcompress checkpoint; got {type(blob).__name__}")
    if all(k.startswith(DDP_PREFIX) for k in state):
        state = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    ours = key == "state_dict" and all(k in blob for k in OURS)
    return {**blob, "state_dict": state} if ours else {"state_dict": state}


def classifier_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of the model's final classifier: the last Linear or 1x1 convolution that
    gives ``model.num_classes`` outputs (recorded by models.create_model; without it, the last one)."""
    classes = getattr(model, "num_classes", None)
    for name, module in reversed(list(model.named_modules())):
        if isinstance(module, nn.Linear):
            outputs = module.out_features
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            outputs = module.out_channels
        else:
            continue
        if classes is None or outputs == classes:
            return [f"{name}.{key}" if name else key for key in module.state_dict()]
    return []


def _other_classes(own: dict, state: dict, head: list[str]) -> list[str]:
    """The head keys whose tensors in ``state`` are shaped for another number of classes (only the
    first dimension differs)."""
    return [k for k in head if k in state and state[k].dim() == own[k].dim() > 0
            and state[k].shape[0] != own[k].shape[0] and state[k].shape[1:] == own[k].shape[1:]]


def _check_fit(own: dict, state: dict, where: str) -> None:
    """One UserError line naming the first missing, unexpected or mis-shaped tensor, and the counts."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise UserError(f"{where}: shape mismatch for {k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)} "
                        f"({len(wrong)} mis-shaped; another architecture, classes or input channels?)")
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"{where}: the file does not fit the model: {what} ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected keys; allowed: weights of the same architecture)")


def load_weights(model: nn.Module, state_dict: dict, source: str | Path, what: str = "",
                 init_key: str = "") -> nn.Module:
    """Load ``state_dict`` into ``model`` as is (strictly). A classifier for another number of classes
    is one line saying so (naming ``init_key``, the params key that starts from such weights and
    trains, if given); any other missing, unexpected or mis-shaped tensor is one line naming the
    first offending key. ``what``: the params key that named the file, for the messages."""
    own, where = model.state_dict(), f"{what} {source}" if what else str(source)
    head = _other_classes(own, state_dict, classifier_keys(model))
    if head:
        hint = f"; to start from these weights and train, use {init_key}" if init_key else ""
        raise UserError(f"{where} predicts {state_dict[head[0]].shape[0]} classes, the data has "
                        f"{own[head[0]].shape[0]}{hint}")
    _check_fit(own, state_dict, where)
    model.load_state_dict(state_dict)
    return model


def init_weights(model: nn.Module, path: str | Path, what: str) -> list[str]:
    """Start ``model`` from the weights in ``path`` (ours, torchvision's or timm's state_dict) to train
    it further: every tensor is loaded, except a classifier head shaped for another number of
    classes, which stays as initialised (one printed note). Any other mismatch is one UserError line;
    ``what`` is the params key that named the file (e.g. distill.student_init). Returns the keys
    left as initialised."""
    state, own = read_checkpoint(path)["state_dict"], model.state_dict()
    head = _other_classes(own, state, classifier_keys(model))
    _check_fit({k: v for k, v in own.items() if k not in head}, {k: v for k, v in state.items() if k not in head},
               f"{what}: {path}")
    model.load_state_dict({**state, **{k: own[k] for k in head}})
    if head:
        print(f"note: {what}: {path}: re-initialised the classifier head ({', '.join(head)}): "
              f"{state[head[0]].shape[0]} classes in the file, {own[head[0]].shape[0]} here")
    return head


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
    if not all(k in ckpt for k in OURS):
        raise UserError(f"{path}: not a kdcompress checkpoint (no architecture recorded)")
    if data is not None and (ckpt["num_classes"], ckpt["in_channels"]) != (len(data.classes), data.input_shape[0]):
        raise UserError(f"{path}: the model takes {ckpt['in_channels']}-channel images and predicts "
                        f"{ckpt['num_classes']} classes; the data has {data.input_shape[0]} channels and "
                        f"{len(data.classes)} classes")
    model = build_model(create_model, ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"])
    load_weights(model, ckpt["state_dict"], path)
    return model.to(device, memory_format=torch.channels_last).eval()
