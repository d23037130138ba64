"""What every stage script shares: argument parsing, the one-line error exit, model loading."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable

import torch

from kdcompress import distributed, tracking
from kdcompress.checkpoint import load_weights, read_checkpoint
from kdcompress.config import load_params
from kdcompress.data import BatchLoader, Split
from kdcompress.resume import ResumePoint, run_key
from kdcompress.runtime import resolve_device, seed_everything
from kdcompress.types import UserError
from models import create_model


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other user mistake
        raise UserError(f"{self.prog}: {message}")


def parser(description: str, **paths: str) -> argparse.ArgumentParser:
    """A parser with ``--params`` and one ``--<name>`` option per path (with its default)."""
    p = _Parser(prog=f"python -m pipeline.{description}", description=description)
    p.add_argument("--params", default="params.yaml")
    for name, default in paths.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=default)
    return p


def stage(main: Callable[[list[str] | None], None]) -> Callable[[list[str] | None], int]:
    """Wrap a stage's main(): a UserError becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0

    return run


def setup(argv, description: str, **paths: str):
    """Parse arguments, load and check all params, seed, pick the device."""
    args = parser(description, **paths).parse_args(argv)
    params = load_params(args.params)
    seed_everything(params["base"].seed, params["base"].num_threads)
    return args, params, distributed.init(resolve_device(params["base"].device))


def build_model(arch: str, num_classes: int, in_channels: int) -> torch.nn.Module:
    """A fresh model from the registry; an unknown name is a one-line UserError."""
    try:
        return create_model(arch, num_classes, in_channels)
    except ValueError as err:
        raise UserError(str(err)) from None


def load_model(path: str, device: torch.device, data=None) -> torch.nn.Module:
    """A model rebuilt from one of our checkpoints, in eval mode, channels_last; with ``data`` (a
    Prepared split set) its classes and input channels must match the data's."""
    ckpt = read_checkpoint(path)
    if "arch" not in ckpt:
        raise UserError(f"{path}: not a kdcompress checkpoint (no architecture recorded)")
    if data is not None and (ckpt["num_classes"], ckpt["in_channels"]) != (len(data.classes), data.input_shape[0]):
        raise UserError(f"{path}: the model takes {ckpt['in_channels']}-channel images and predicts "
                        f"{ckpt['num_classes']} classes; the data has {data.input_shape[0]} channels and "
                        f"{len(data.classes)} classes")
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"])
    load_weights(model, ckpt["state_dict"], path)
    return model.to(device, memory_format=torch.channels_last).eval()


def loader(split: Split, meta: dict, device, batch_size: int, **kw) -> BatchLoader:
    return BatchLoader(split, meta["mean"], meta["std"], device, batch_size, **kw)


def resume_point(path: str, stage_name: str, params: dict, sections: tuple[str, ...],
                 inputs: list[str]) -> tuple[ResumePoint, dict | None]:
    """The stage's resume file and the state a killed run with the same params ``sections``, input
    files and code left in it (None: start fresh; the MLflow run of a stale file is marked KILLED)."""
    used = {k: dataclasses.asdict(params[k]) if dataclasses.is_dataclass(params[k]) else params[k] for k in sections}
    point = ResumePoint(path, run_key(stage_name, used, inputs))
    state = point.load()
    if point.stale_run_id and distributed.is_main():
        tracking.mark_killed(point.stale_run_id)
    return point, state
