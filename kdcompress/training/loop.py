"""The one training loop, ``fit()``, used for the teacher and for every student.

Methods differ only by the objects passed in (the distiller's loss, the sample selector),
never by branches here. The LR schedule is indexed by true epochs, so a selector that trains on
a subset still follows the same schedule.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kdcompress.common import distributed
from kdcompress.training.resume import rng_state, set_rng_state, to_cpu

if TYPE_CHECKING:
    from kdcompress.config import TrainConfig
    from kdcompress.data.loader import BatchLoader
    from kdcompress.training.distiller import Distiller
    from kdcompress.training.selection.base import SampleSelector

EpochCallback = Callable[[int, dict], None]


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at ``progress`` in [0, 1] of the whole run."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))
    warm = 0.15  # one-cycle: linear warm-up from lr/25, then cosine down to lr/1e4
    if progress < warm:
        return cfg.lr / 25 + (cfg.lr - cfg.lr / 25) * progress / warm
    t = (progress - warm) / (1 - warm)
    return cfg.lr / 1e4 + 0.5 * (cfg.lr - cfg.lr / 1e4) * (1 + math.cos(math.pi * t))


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.inference_mode()
def predict(model: torch.nn.Module, loader: BatchLoader, desc: str = "predict") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole split, in order (model put in eval mode, restored after)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y, _ in tqdm(loader.batches(), total=loader.num_batches(), desc=desc, leave=False, disable=None):
        logits.append(model(x).float())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


@dataclass
class FitResult:
    best_state: dict  # student state_dict at the best validation accuracy
    best_epoch: int
    best_val_acc: float
    last_state: dict  # everything needed to resume (see kdcompress.resume), on the CPU
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def fit(distiller: Distiller, train: BatchLoader, val: BatchLoader, selector: SampleSelector, cfg: TrainConfig,
        callbacks: list[EpochCallback] = (), resume: dict | None = None,
        checkpoint: Callable[[dict], None] | None = None, precision: str = "fp32") -> FitResult:
    """Train for ``cfg.epochs``. ``checkpoint`` gets the whole training state after every epoch;
    passing such a state back as ``resume`` continues after its epoch exactly as if never stopped.
    ``precision``: the step's forward under autocast in bf16 or fp16 (fp16 with a GradScaler)."""
    student = distiller.student
    probe = next(train.batches())[0]
    distiller.setup(probe)
    rank, world = distributed.world()
    model = distiller
    if world > 1:  # global-batch BN, then DDP averages the gradients of the student and the loss's modules
        distributed.convert_batchnorm(distiller)
        model = DistributedDataParallel(distiller, find_unused_parameters=True, broadcast_buffers=False)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    device = probe.device
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start_epoch, best_acc, best_epoch, best_state, history, seconds = 0, -1.0, -1, None, [], 0.0
    if resume is not None:
        student.load_state_dict(resume["student"])
        if distiller.loss is not None:
            distiller.loss.load_state_dict(resume["loss"])
        if distiller.router is not None:
            distiller.router.load_state_dict(resume["router"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        selector.load_state_dict(resume["selector"])
        start_epoch, best_acc, best_epoch = resume["epoch"] + 1, resume["best_val_acc"], resume["best_epoch"]
        best_state, history, seconds = resume["best_state"], resume["history"], resume["seconds"]
        set_rng_state(resume["rng"])

    def state(epoch: int) -> dict:
        return {**to_cpu({
            "student": student.state_dict(),
            "loss": distiller.loss.state_dict() if distiller.loss is not None else {},
            "router": distiller.router.state_dict() if distiller.router is not None else {},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "selector": selector.state_dict(),
            "epoch": epoch,
            "best_val_acc": best_acc, "best_epoch": best_epoch, "best_state": best_state, "history": history,
            "seconds": seconds + time.perf_counter() - t0}), "rng": rng_state()}

    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        rounds_before = len(selector.history)
        indices = selector.select(epoch)
        distiller.on_epoch_start(epoch, cfg.epochs)
        distiller.train()
        n_batches = train.num_batches(len(indices))
        # accumulated on the device: no host synchronisation inside the step
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        correct, seen = torch.zeros((), dtype=torch.long, device=device), 0
        bar = tqdm(train.batches(indices, shuffle=True, augment=True, epoch=epoch, shard=(rank, world)),
                   total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if rank == 0 else True)
        for i, (x, y, idx) in enumerate(bar):
            lr = lr_at(cfg, (epoch + i / n_batches) / cfg.epochs)
            for group in optimizer.param_groups + distiller.auxiliary_param_groups():
                group["lr"] = lr * group.get("lr_scale", 1.0)
            with autocast(device, precision):
                out = model(x, y, selector.weights(idx), idx)
            # this rank's share of the global batch mean: DDP's average over ranks makes it whole
            global_n = min(train.batch_size, len(indices) - i * train.batch_size)
            loss = out.loss * (len(y) * world / global_n) if world > 1 else out.loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            distiller.after_step()
            selector.observe(idx, out.per_sample)
            total_loss += out.per_sample.double().sum()  # a rank with no sample of the last batch adds 0
            correct += (out.logits.argmax(1) == out.target).sum()  # data_free trains on teacher labels
            seen += len(y)
        distiller.on_epoch_end()
        seen = int(distributed.all_sum(torch.tensor(seen, device=device)))
        distributed.all_sum(total_loss), distributed.all_sum(correct)
        train_seconds = time.perf_counter() - t_epoch
        val_logits, val_labels = predict(student, val, desc="val")
        val_acc = (val_logits.argmax(1) == val_labels).float().mean().item()
        metrics = {"train_loss": total_loss.item() / max(seen, 1), "train_acc": correct.item() / max(seen, 1),
                   "val_acc": val_acc,
                   "lr": optimizer.param_groups[0]["lr"], "samples": seen, "epoch_seconds": train_seconds,
                   **distiller.epoch_metrics(val)}
        if len(selector.history) > rounds_before:
            metrics.update({f"selection_{k}": v for k, v in selector.history[-1].items()
                            if isinstance(v, (int, float))})
        history.append({"epoch": epoch, **metrics})
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(student.state_dict())
        for cb in callbacks:  # the stage passes callbacks and a checkpoint to rank 0 only
            cb(epoch, metrics)
        if checkpoint is not None:
            checkpoint(state(epoch))
        if rank == 0:  # one line per epoch, not one per process
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.4f} "
                       f"train_acc {metrics['train_acc']:.4f} val_acc {val_acc:.4f} ({train_seconds:.0f}s)")
    last_state = state(cfg.epochs - 1)
    return FitResult(best_state, best_epoch, best_acc, last_state, history, last_state["seconds"])
