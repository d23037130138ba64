"""Teacher outputs stored on disk per (epoch, sample), so the second and later runs of a sweep skip
the frozen teacher's forward pass (most of a distillation epoch on a CPU).

The augmented image of sample ``i`` in epoch ``e`` is a pure function of (seed, e, i) (see
``BatchLoader``), so the teacher's output on it is too, given the teacher, the prepared data, the
seed, the augmentation settings and the teacher runtime: those form the cache key. Both parts a
method may read are stored whatever the filling method reads (``logits`` and the pooled
``embedding``, float32, so a hit returns exactly what the live teacher returned when the entry was
written): one fill of a seed serves the logit and the embedding methods of a sweep alike. Methods
that read feature maps keep the live teacher. One file per epoch with a mask of the samples filled
(a SAKD run fills only its subset), written atomically when the epoch ends. The folder lives
outside DVC's outputs and is capped (``KDCOMPRESS_CACHE_GB``, default 4): the least recently used
keys are removed first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from kdcompress.common.tracking import file_sha, project_root
from kdcompress.io import atomic_write
from kdcompress.types import ModelOutput

CACHEABLE = frozenset({"logits", "embedding"})
CACHE_FOLDER = "artifacts/cache/teacher"  # under the project root (DVC_ROOT), shared by `dvc exp` runs


def cache_root() -> Path:
    """``KDCOMPRESS_CACHE_DIR`` if set, else ``artifacts/cache/teacher`` in the project root."""
    return Path(os.environ.get("KDCOMPRESS_CACHE_DIR") or project_root() / CACHE_FOLDER)


def cache_key(**what) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def for_run(teacher: str | Path, data_dir: str | Path, num_samples: int, parts: frozenset[str], runtime: str,
            **view) -> TeacherCache:
    """The cache of one teacher (file), prepared training split and teacher runtime, for one view of
    the images (``view``: seed and augmentation settings, or ``clean=True``), for a run that reads
    ``parts``; says in one line how many epochs it already holds."""
    key = cache_key(teacher=file_sha(teacher), data=file_sha(Path(data_dir) / "train.pt"), runtime=runtime,
                    **view)
    cache = TeacherCache(cache_root(), key, num_samples, parts)
    print(f"teacher cache {key} ({', '.join(f'{k}={v}' for k, v in view.items())}): "
          f"{cache.cached_epochs()} epochs stored in {cache_root()}")
    return cache


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class TeacherCache:
    """``begin_epoch(e)``, then per batch ``lookup(index)`` (a ``ModelOutput`` or None) and, on a
    miss, ``store(index, out)``; ``end_epoch()`` writes what the epoch added. ``parts``: what this
    run reads; an epoch stored without one of them is a miss, and is rewritten with all parts."""

    def __init__(self, root: str | Path, key: str, num_samples: int, parts: frozenset[str],
                 max_bytes: int | None = None):
        self.root = Path(root)
        self.folder = self.root / key
        self.num_samples = num_samples
        self.parts = tuple(sorted(parts & CACHEABLE))
        gb = float(os.environ.get("KDCOMPRESS_CACHE_GB", "4"))
        self.max_bytes = int(gb * 1e9) if max_bytes is None else max_bytes
        self.epoch: int | None = None
        self.arrays: dict[str, torch.Tensor] = {}
        self.filled = torch.zeros(0, dtype=torch.bool)
        self.added = 0
        self.hits = self.misses = 0
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def usable(parts: frozenset[str] | None) -> bool:
        return bool(parts) and parts <= CACHEABLE

    def cached_epochs(self) -> int:
        return len(list(self.folder.glob("epoch-*.pt")))

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}.pt"

    def begin_epoch(self, epoch: int) -> None:
        self.epoch, self.added = epoch, 0
        blob = None
        if self.path(epoch).exists():
            try:
                blob = torch.load(self.path(epoch), map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - a damaged entry is a miss, rewritten at the epoch's end
                blob = None
        if blob is not None and set(self.parts) <= set(blob) and len(blob["filled"]) == self.num_samples:
            self.arrays, self.filled = {k: blob[k] for k in CACHEABLE if k in blob}, blob["filled"]
        else:
            self.arrays, self.filled = {}, torch.zeros(self.num_samples, dtype=torch.bool)

    def lookup(self, index: torch.Tensor) -> ModelOutput | None:
        idx = index.cpu()
        if not self.arrays or not bool(self.filled[idx].all()):
            self.misses += len(idx)
            return None
        self.hits += len(idx)
        device = index.device
        logits = self.arrays["logits"][idx].to(device) if "logits" in self.arrays else None
        embedding = self.arrays["embedding"][idx].to(device) if "embedding" in self.arrays else None
        return ModelOutput(logits=logits, embedding=embedding)

    def store(self, index: torch.Tensor, out: ModelOutput) -> None:
        idx = index.cpu()
        for part in sorted(CACHEABLE):
            value = getattr(out, part)
            if value is None:
                continue
            value = value.detach().float().cpu()
            if part not in self.arrays:
                if bool(self.filled.any()):  # an entry begun without this part stays without it
                    continue
                self.arrays[part] = torch.zeros(self.num_samples, *value.shape[1:], dtype=torch.float32)
            self.arrays[part][idx] = value
        self.filled[idx] = True
        self.added += len(idx)

    def end_epoch(self) -> None:
        if self.epoch is None or not self.added:
            return
        blob = {**self.arrays, "filled": self.filled}
        atomic_write(self.path(self.epoch), lambda f: torch.save(blob, f))
        os.utime(self.folder)  # most recently used
        self.evict()

    def evict(self) -> None:
        """Remove whole keys, least recently used first, until the cache fits its cap."""
        keys = sorted((p for p in self.root.iterdir() if p.is_dir() and p != self.folder),
                      key=lambda p: p.stat().st_mtime)
        total = folder_bytes(self.root)
        for old in keys:
            if total <= self.max_bytes:
                break
            total -= folder_bytes(old)
            shutil.rmtree(old, ignore_errors=True)

    def summary(self) -> str:
        return (f"teacher cache {self.folder.name}: {self.hits} samples from the cache, {self.misses} from the "
                f"teacher ({'hit' if self.hits and not self.misses else 'miss' if not self.hits else 'partial'})")
