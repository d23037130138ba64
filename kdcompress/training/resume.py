"""Exact resume of a killed training stage.

At the end of every epoch ``fit()`` hands its whole state to a ``ResumePoint``, which writes it
atomically (fsync, then rename) to a file DVC never deletes (``artifacts/resume/<stage>.pt``, not
a stage output). The file is keyed by a hash of everything the run depends on: the stage's
params, the content of its input files, the project code and the torch version. A rerun with the
same key picks up after the last finished epoch and ends bitwise identical to an uninterrupted
run on the CPU; with any other key the file is stale: one line says so and the run starts fresh.
The stage removes the file once its outputs are written.

What the state holds: model(s), the loss's own modules, optimizer, epoch, best state, history,
the selector's state, elapsed seconds, the MLflow run id, and the python / numpy / torch (CPU and
CUDA) RNG states. The data loader needs none: its order and augmentation are pure functions of
(seed, epoch, sample). All tensors are on the CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from kdcompress.common import distributed, tracking
from kdcompress.io import atomic_write

PROJECT = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ("kdcompress", "models", "pipeline")


def _digest_files(digest, paths) -> None:
    for path in sorted(Path(p) for p in paths):
        digest.update(str(path.name).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)


def run_key(stage: str, params: dict, inputs: list[str | Path]) -> str:
    """Hash of the stage name, its params (JSON-able), its input files (folders: every file in them)
    and the project's code: two runs with the same key compute the same thing."""
    digest = hashlib.sha256(json.dumps([stage, params, torch.__version__], sort_keys=True, default=str).encode())
    files = []
    for item in map(Path, inputs):
        files += sorted(p for p in item.rglob("*") if p.is_file()) if item.is_dir() else [item]
    _digest_files(digest, files)
    _digest_files(digest, (p for folder in CODE_FOLDERS for p in (PROJECT / folder).rglob("*.py")))
    return digest.hexdigest()[:16]


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_cpu(obj):
    """A deep copy of ``obj`` with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class ResumePoint:
    """The resume file of one stage run: ``load()`` the state a killed run left (or None),
    ``save(state)`` after each epoch, ``clear()`` when the stage's outputs are written."""

    def __init__(self, path: str | Path, key: str):
        self.path = Path(path)
        self.key = key
        self.stale_run_id: str | None = None  # the MLflow run of a discarded stale file

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            key, state = blob["key"], blob["state"]
        except Exception as err:  # noqa: BLE001 - a file from another version, a disk error, ...
            print(f"resume: {self.path} is unreadable ({type(err).__name__}); starting fresh")
            return None
        if key != self.key:
            self.stale_run_id = state.get("mlflow_run_id")
            print(f"resume: {self.path} is from a run with other params, inputs or code; starting fresh")
            return None
        print(f"resume: continuing after epoch {state['epoch'] + 1} from {self.path}")
        return state

    def save(self, state: dict, **extra) -> None:
        atomic_write(self.path, lambda f: torch.save({"key": self.key, "state": {**state, **extra}}, f))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def resume_point(path: str, stage_name: str, params: dict, sections: tuple[str, ...],
                 inputs: list[str], **resolved) -> tuple[ResumePoint, dict | None]:
    """The stage's resume file and the state a killed run with the same params ``sections``, input
    files and code left in it (None: start fresh; the MLflow run of a stale file is marked KILLED).
    ``resolved``: what the params leave to the host (e.g. ``precision`` for ``auto``), keyed too."""
    used = {k: dataclasses.asdict(params[k]) if dataclasses.is_dataclass(params[k]) else params[k] for k in sections}
    used["resolved"] = resolved
    point = ResumePoint(path, run_key(stage_name, used, inputs))
    state = point.load()
    if point.stale_run_id and distributed.is_main():
        tracking.mark_killed(point.stale_run_id)
    return point, state
