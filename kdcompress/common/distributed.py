"""Training in several processes (torch DDP), on one machine or several: when ``base.nproc`` x
``base.nnodes`` > 1 the stage started by ``python -m pipeline.<stage>`` (what dvc.yaml runs) starts
its workers itself (``launch``: torch's elastic launcher, torchrun's c10d rendezvous), and is the
one process the user sees: a user error is one line and exit 2, and no worker outlives it.

Every rank builds the same models from the same seed, walks the same seeded permutation and takes
its slice of every global batch, so N processes with global batch B take the same steps as one
process with batch B: the loss is scaled so that DDP's gradient average is the global batch mean,
batch normalisation uses the statistics of the global batch (``GlobalBatchNorm``, which also runs
on the CPU with gloo), and batch-level losses see the gathered global batch (``gather`` keeps the
gradients). Only rank 0 writes files and talks to MLflow. Backend: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


LAUNCHER_PID = "KDCOMPRESS_LAUNCHER_PID"  # a worker's parent, set by launch()
ERROR_DIR = "KDCOMPRESS_ERROR_DIR"  # where launch()'s workers leave their one-line user error (pipeline._common)
USER_ERROR = 2  # the exit code of a user mistake
RDZV_SECONDS = 900  # how long the machines wait for each other, in whichever order they start


def wanted(base) -> bool:
    """Whether this process is to start the stage's workers: several processes asked for
    (``base.nproc`` x ``base.nnodes``) and this one is not already one of them (torchrun's or ours)."""
    return base.nproc * base.nnodes > 1 and "LOCAL_RANK" not in os.environ


def _root_cause(item) -> tuple:
    """Sort key of a launch's failures, the root cause first: killed by a signal, then failed, then
    stopped by the SIGTERM the launcher sends the rest; the earliest, the lowest rank."""
    rank, failure = item
    kind = 2 if failure.exitcode == -signal.SIGTERM else 0 if failure.exitcode < 0 else 1
    return kind, failure.timestamp, rank


def launch(module: str, argv: list[str] | None, base) -> int:
    """Run ``python -m <module> <argv>`` in ``base.nproc`` workers on this machine, joined with
    ``base.nnodes - 1`` other machines at ``base.rdzv_endpoint`` (c10d rendezvous; one machine: a free
    local port, like ``torchrun --standalone``); wait; the exit code. A worker's user error is printed
    once, as one line (exit 2); a crash is one line after the worker's own output (exit 1)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    single = base.nnodes == 1
    config = LaunchConfig(min_nodes=base.nnodes, max_nodes=base.nnodes, nproc_per_node=base.nproc,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0" if single else base.rdzv_endpoint,
                          run_id=uuid.uuid4().hex if single else f"kdcompress-{module}", max_restarts=0,
                          rdzv_configs={} if single else {"timeout": RDZV_SECONDS, "read_timeout": RDZV_SECONDS})
    errors = Path(tempfile.mkdtemp(prefix="kdcompress-launch-"))
    saved = {k: os.environ.get(k) for k in (LAUNCHER_PID, ERROR_DIR)}
    os.environ.update({LAUNCHER_PID: str(os.getpid()), ERROR_DIR: str(errors)})
    logging.disable(logging.ERROR)  # the launcher's own log lines (a worker stopped, failed, ...): we say it in one
    if not single:
        print(f"{module}: {base.nproc} process(es) here; waiting for all {base.nnodes} machines at "
              f"{base.rdzv_endpoint}", flush=True)
    try:
        elastic_launch(config, sys.executable)("-m", module, *(sys.argv[1:] if argv is None else argv))
        return 0
    except ChildFailedError as err:
        messages = sorted(errors.iterdir(), key=lambda f: int(f.name))
        if messages:  # the user error of the lowest rank that had one (usually every rank has the same)
            print(messages[0].read_text().strip(), file=sys.stderr)
            return USER_ERROR
        rank, failure = min(err.failures.items(), key=_root_cause)
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        print(f"error: {module}: training process {rank} of {base.nproc * base.nnodes} {how} (its output is above)",
              file=sys.stderr)
        return 1
    except RendezvousError as err:
        where = "this machine" if single else f"base.rdzv_endpoint {base.rdzv_endpoint}"
        print(f"error: {module}: the rendezvous of {base.nnodes} machine(s) at {where} failed: "
              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
        return 1
    except SignalException as err:  # SIGTERM, SIGINT, ...: the workers were stopped; die of it quietly
        return 128 + int(err.sigval)
    finally:
        logging.disable(logging.NOTSET)
        shutil.rmtree(errors, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (the launcher) dies, however it dies.
    torchrun starts every worker in a session of its own, so a kill of the launcher's process group
    (what a terminal or ``kill -9 -PGID`` does to ``dvc repro``) would otherwise leave it training."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
        return
    expected = os.environ.get(LAUNCHER_PID)
    if expected and os.getppid() != int(expected):  # the launcher died before we asked
        os._exit(128 + int(signal.SIGKILL))


def _stopped(signum, frame):
    """A worker told to stop (the launcher passes on Ctrl-C and SIGTERM): exit without a traceback;
    the launcher says why, once. After the stage's code (atexit callbacks), exit at once."""
    while frame is not None and frame.f_code.co_name != "_run_module_as_main":  # runpy: python -m ...
        frame = frame.f_back
    if frame is None:
        os._exit(128 + signum)
    raise SystemExit(128 + signum)


def init(device: torch.device) -> torch.device:
    """Join the process group the launcher describes (``WORLD_SIZE > 1``); the device of this rank."""
    if "LOCAL_RANK" in os.environ:
        die_with_parent()
        if os.environ.get(LAUNCHER_PID):  # ours: Ctrl-C or SIGTERM, passed on by the launcher, ends it quietly
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _stopped)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def batch_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's ``n`` (its share of the batch), in rank order."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world()[1])]
    dist.all_gather(sizes, torch.tensor([n], device=device))
    return [int(s) for s in sizes]


def gather(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """``t`` of every rank concatenated along dim 0 in rank order, with gradients flowing back to
    each rank's own part; ranks may hold different batch sizes (``sizes``: ``batch_sizes``, when
    the caller already has them)."""
    sizes = batch_sizes(len(t), t.device) if sizes is None else sizes
    padded = torch.cat([t, t.new_zeros(max(sizes) - len(t), *t.shape[1:])]) if len(t) < max(sizes) else t
    parts = dist_nn.all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (no gradient), in place."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank, in place (same shape and dtype everywhere)."""
    if world()[1] > 1:
        dist.broadcast(t, src)
    return t


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across ranks (CPU and
    GPU); in a single process, or in eval mode, it is plain BatchNorm2d. Same parameters, buffers
    and state_dict keys, so checkpoints load into the plain model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world()[1] == 1:
            return super().forward(x)
        dims = (0, 2, 3)
        count = dist_nn.all_reduce(torch.tensor(float(x.numel() // x.shape[1]), device=x.device))
        mean = dist_nn.all_reduce(x.sum(dims)) / count
        centred = x - mean[None, :, None, None]
        var = dist_nn.all_reduce(centred.square().sum(dims)) / count  # two passes, like the single-process kernel
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * count / (count - 1))
        y = centred / torch.sqrt(var + self.eps)[None, :, None, None]
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d in ``module`` becomes a GlobalBatchNorm holding the same tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats, device=child.running_mean.device)
            replacement.weight, replacement.bias = child.weight, child.bias
            replacement.running_mean, replacement.running_var = child.running_mean, child.running_var
            replacement.num_batches_tracked = child.num_batches_tracked
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child)
    return module
