"""Training in several processes (torch DDP), started by ``torchrun`` when ``base.nproc > 1``.

Every rank builds the same models from the same seed, walks the same seeded permutation and takes
its slice of every global batch, so N processes with global batch B take the same steps as one
process with batch B: the loss is scaled so that DDP's gradient average is the global batch mean,
batch normalisation uses the statistics of the global batch (``GlobalBatchNorm``, which also runs
on the CPU with gloo), and batch-level losses see the gathered global batch (``gather`` keeps the
gradients). Only rank 0 writes files and talks to MLflow. Backend: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os

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


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE > 1``); the device of this rank."""
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
