"""Teacher outputs stored on disk per (epoch, sample), so the second and later runs of a sweep skip
the frozen teacher's forward pass (most of a distillation epoch on a CPU).

The augmented image of sample ``i`` in epoch ``e`` is a pure function of (seed, e, i) (see
``BatchLoader``), so the teacher's output on it is too, given everything ``cache_key`` takes: the
teacher (its checkpoint's bytes and the code of its modules), the prepared data and its
normalisation, the seed and augmentation settings, the runtime that serves the teacher and its
version, the hardware, the precision its forward runs in and, for SAKD's int8 pass teacher, the
calibration settings. Nothing else is in the key, so runs that differ only elsewhere (the student,
the KD temperature, ...) share it. Both parts a method may read are stored whatever the filling
method reads (``logits`` and the pooled ``embedding``, float32, so a hit returns exactly what the
live teacher returned when the entry was written): one fill of a seed serves the logit and the
embedding methods of a sweep alike. Methods that read feature maps keep the live teacher. One file
per epoch with a mask of the samples filled (a SAKD run fills only its subset), written atomically
when the epoch ends (runs filling one key side by side: the last write wins, each write is whole).
The folder lives outside DVC's outputs and is capped (``KDCOMPRESS_CACHE_GB``, default 4): the
least recently used keys are removed first, never one in use: every run holds a shared ``flock`` on
its key's lease file for as long as it has the cache open (the kernel drops it when the process
ends, however it ends), and a key is removed only by the one who gets the exclusive lock on it.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import math
import os
import shutil
import stat
import uuid
import weakref
from pathlib import Path

import torch
from torch import nn

from kdcompress.common.tracking import project_root
from kdcompress.data.prepared import load_meta, train_sha
from kdcompress.io import atomic_write, file_sha
from kdcompress.training.ort_teacher import OrtTeacher
from kdcompress.types import ModelOutput, UserError

CACHEABLE = frozenset({"logits", "embedding"})
CACHE_FOLDER = "artifacts/cache/teacher"  # under the project root (DVC_ROOT), shared by `dvc exp` runs
LEASE = ".lease"  # in every key's folder: each run that uses the key holds a shared flock on it
EVICTED = ".evicted-"  # a key being removed is first renamed to this prefix: no run sees half of it


def cache_root() -> Path:
    """``KDCOMPRESS_CACHE_DIR`` if set, else ``artifacts/cache/teacher`` in the project root."""
    return Path(os.environ.get("KDCOMPRESS_CACHE_DIR") or project_root() / CACHE_FOLDER)


def max_cache_bytes() -> int:
    """The cap ``KDCOMPRESS_CACHE_GB`` (gigabytes, default 4) in bytes."""
    raw = os.environ.get("KDCOMPRESS_CACHE_GB", "4")
    try:
        gb = float(raw)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb >= 0):
        raise UserError(f"KDCOMPRESS_CACHE_GB: {raw!r} is not a size in gigabytes; allowed: a number >= 0")
    return int(gb * 1e9)


def cache_key(*, teacher: str, model_code: str, data: str, normalisation: dict, geometry: dict, seed: int | None,
              augmentation: dict | None, runtime: str, versions: dict, device: str, precision: str,
              int8: dict | None) -> str:
    """The key of the teacher's outputs on one view of the training split, from everything that can
    change them: ``teacher``, the checkpoint's sha; ``model_code``, see ``model_code``; ``data``, the
    sha of the prepared training split (its images, or its index of files and their content hashes);
    ``normalisation``, its channel mean and std; ``geometry``, how files or stored pixels become inputs
    (size, evaluation crop, training transform); ``seed`` and ``augmentation`` (crop padding, flip) of
    the images, None for the un-augmented ones; ``runtime`` (torch, onnxruntime) and the ``versions``
    that make its kernels (and graph: ``runtime_versions``); ``device``, the hardware they run on;
    ``precision``, that of the forward (fp32, the torch runtime's autocast dtype, int8); ``int8``, the
    calibration settings of an int8 teacher, else None. Nothing else may change the outputs, so nothing
    else is a field."""
    fields = dict(locals())  # exactly the named fields above
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def teacher_runtime(teacher: nn.Module | None) -> str:
    """Who serves the teacher's forward: ``onnxruntime`` (an ``OrtTeacher``) or ``torch``."""
    return "onnxruntime" if isinstance(teacher, OrtTeacher) else "torch"


def runtime_versions(teacher: nn.Module) -> dict[str, str | int]:
    """torch's version and, for an ``OrtTeacher``, onnx's and onnxruntime's too, and the opset of its
    graph (torch exports it)."""
    versions: dict[str, str | int] = {"torch": torch.__version__}
    if isinstance(teacher, OrtTeacher):
        import onnx
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__,
                        opset=max(op.version for op in teacher.proto.opset_import if op.domain in ("", "ai.onnx")))
    return versions


def device_name(device: torch.device) -> str:
    """The hardware the kernels are chosen for: the GPU's model, else the CPU's vector instruction set."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"{device.type} {torch.backends.cpu.get_cpu_capability()}"


def _source(cls: type) -> bytes:
    try:
        return Path(inspect.getsourcefile(cls)).read_bytes()
    except (TypeError, OSError):  # no source file (a class defined interactively): its name
        return f"{cls.__module__}.{cls.__qualname__}".encode()


def model_code(model: nn.Module) -> str:
    """A digest of the source files that define the classes of ``model``'s modules outside torch (the
    project's architectures, ``OrtTeacher``, torchvision's models): an edit there can change the outputs
    and not the checkpoint's bytes (torch's own code is in its version)."""
    sources = {_source(cls) for module in model.modules() for cls in type(module).__mro__
               if cls.__module__.partition(".")[0] not in ("torch", "builtins")}
    return hashlib.sha256(b"".join(sorted(sources))).hexdigest()[:16]


def for_run(teacher_file: str | Path, data_dir: str | Path, teacher: nn.Module, device: torch.device,
            num_samples: int, parts: frozenset[str], *, autocast: str = "fp32", seed: int | None = None,
            crop_padding: int = 0, hflip: bool = False, int8: dict | None = None) -> TeacherCache:
    """The cache of ``teacher``'s outputs (loaded from ``teacher_file``, served on ``device``) on the
    prepared training split in ``data_dir``, for a run that reads ``parts``: on the images augmented by
    ``seed``, ``crop_padding`` and ``hflip`` with the forward under ``autocast`` (fit()'s precision),
    or by default on the clean images outside autocast (SAKD's first difficulty pass; ``int8``: the
    calibration settings of its int8 pass teacher). Says in one line how many epochs it already holds."""
    runtime = teacher_runtime(teacher)
    precision = "int8" if int8 is not None else autocast if runtime == "torch" else "fp32"
    meta = load_meta(data_dir)
    augmented = crop_padding > 0 or hflip or meta.get("geometry", {}).get("train_transform") == "random_resized_crop"
    key = cache_key(teacher=file_sha(teacher_file), model_code=model_code(teacher),
                    data=train_sha(data_dir), normalisation={"mean": meta["mean"], "std": meta["std"]},
                    geometry=meta.get("geometry", {}), seed=seed if augmented else None,
                    augmentation={"crop_padding": crop_padding, "hflip": hflip} if augmented else None,
                    runtime=runtime, versions=runtime_versions(teacher), device=device_name(device),
                    precision=precision, int8=int8)
    cache = TeacherCache(cache_root(), key, num_samples, parts)
    view = f"seed={seed}, crop_padding={crop_padding}, hflip={hflip}" if augmented else "clean images"
    print(f"teacher cache {key} ({view}, {runtime} {precision}): "
          f"{cache.cached_epochs()} epochs stored in {cache_root()}")
    return cache


def lock(folder: Path, exclusive: bool = False) -> int | None:
    """The open descriptor of ``folder``'s lease file, flock-ed. Shared (a run using the key): waits
    out an eviction in progress, then makes the folder afresh. Exclusive (an evictor): never waits;
    None when a run holds the key or it is gone."""
    lease = folder / LEASE
    while True:
        if not exclusive:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lease, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was evicted meanwhile
            if exclusive:
                return None
            continue
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if exclusive else fcntl.LOCK_SH)
            if os.path.samestat(os.fstat(fd), os.stat(lease)):  # still the key's lease, not an evicted one
                return fd
        except (BlockingIOError, FileNotFoundError):  # in use; or evicted while we waited
            pass
        os.close(fd)
        if exclusive:
            return None


def remove_unused(folder: Path) -> bool:
    """Remove the key folder ``folder`` unless a run holds its lease: renamed away under the exclusive
    lock (no run can take the lease meanwhile, and none sees half a key), then deleted."""
    fd = lock(folder, exclusive=True)
    if fd is None:
        return False
    trash = folder.with_name(f"{EVICTED}{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        folder.rename(trash)
    except OSError:
        return False
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def folder_bytes(path: Path) -> int:
    """The bytes of the files under ``path`` (one another run removes meanwhile counts as gone)."""
    total = 0
    for parent, _, names in os.walk(path):
        for name in names:
            try:
                total += os.stat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                pass
    return total


def keys_by_age(root: Path) -> list[Path]:
    """The key folders under ``root``, least recently used first."""
    stamped = []
    for path in root.iterdir():
        try:
            info = path.stat()
        except FileNotFoundError:  # evicted meanwhile
            continue
        if stat.S_ISDIR(info.st_mode) and not path.name.startswith("."):
            stamped.append((info.st_mtime, path.name, path))
    return [path for *_, path in sorted(stamped)]


class TeacherCache:
    """``begin_epoch(e)``, then per batch ``lookup(index)`` (a ``ModelOutput`` or None) and, on a
    miss, ``store(index, out)``; ``end_epoch()`` writes what the epoch added. ``parts``: what this
    run reads; an epoch stored without one of them is a miss, and is rewritten with all parts.
    From creation to ``close()`` (or until it is garbage or the process ends) it holds the key's
    lease, so no run evicts the key meanwhile."""

    def __init__(self, root: str | Path, key: str, num_samples: int, parts: frozenset[str],
                 max_bytes: int | None = None):
        self.root = Path(root)
        self.folder = self.root / key
        self.num_samples = num_samples
        self.parts = tuple(sorted(parts & CACHEABLE))
        self.max_bytes = max_cache_bytes() if max_bytes is None else max_bytes
        self.epoch: int | None = None
        self.arrays: dict[str, torch.Tensor] = {}
        self.filled = torch.zeros(0, dtype=torch.bool)
        self.added = 0
        self.hits = self.misses = 0
        try:  # close(): give the lease back (at the latest when this cache is garbage, or at exit)
            self.close = weakref.finalize(self, os.close, lock(self.folder))
        except OSError as err:
            raise UserError(f"{self.folder}: the teacher cache cannot be written there ({err.strerror}); set "
                            "KDCOMPRESS_CACHE_DIR to a writable folder, or distill.teacher_cache: false") from None

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
        """Remove whole keys, least recently used first, until the cache fits its cap; a key a run holds
        the lease of (this one's too) is in use and stays, however old."""
        for trash in self.root.glob(f"{EVICTED}*"):  # left by an evictor killed while deleting
            shutil.rmtree(trash, ignore_errors=True)
        total = folder_bytes(self.root)
        for old in keys_by_age(self.root):
            if total <= self.max_bytes:
                break
            size = folder_bytes(old)
            if remove_unused(old):
                total -= size

    def summary(self) -> str:
        return (f"teacher cache {self.folder.name}: {self.hits} samples from the cache, {self.misses} from the "
                f"teacher ({'hit' if self.hits and not self.misses else 'miss' if not self.hits else 'partial'})")
