"""The teacher stage as one function: train the teacher with the shared fit() loop (best checkpoint
on val), or load the user's own weights from ``teacher.checkpoint``, and write what DVC tracks."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from kdcompress.common import distributed, tracking
from kdcompress.common.checkpoint import build_model, init_weights, load_weights, read_checkpoint, save_checkpoint
from kdcompress.data.loader import make_loader
from kdcompress.data.prepared import load_prepared
from kdcompress.io import write_csv, write_json
from kdcompress.runtime import resolve_device, resolve_precision
from kdcompress.training import curves
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit, predict
from kdcompress.training.resume import resume_point
from kdcompress.training.selection import FullData


def train_teacher(params: dict, paths: SimpleNamespace, create_model: Callable) -> dict | None:
    """Train (or load) the teacher; ``paths`` has data, out, resume, metrics and plots. Returns the
    summary on the main process (None on the others, which train their share and write nothing)."""
    device = distributed.init(resolve_device(params["base"].device))
    cfg = params["teacher"]
    data = load_prepared(paths.data, splits=("val",) if cfg.checkpoint else ("train", "val"))
    model = build_model(create_model, cfg.model, len(data.classes), data.input_shape[0])
    if cfg.init:
        init_weights(model, cfg.init, "teacher.init")
    val = make_loader(data, "val", device, cfg.eval_batch_size, workers=params["data"].workers)
    model.to(device, memory_format=torch.channels_last)
    history, point, teach, resumed = [], None, None, None
    precision, why = resolve_precision(cfg.precision, model, device)
    if not cfg.checkpoint:
        point, resumed = resume_point(paths.resume, "train_teacher", params, ("base", "teacher"),
                                      [paths.data, *([cfg.init] if cfg.init else [])], precision=precision)
        train = make_loader(data, "train", device, cfg.batch_size, workers=params["data"].workers,
                            crop_padding=cfg.crop_padding, hflip=cfg.hflip, seed=params["base"].seed)
        teach = functools.partial(fit, Distiller(model, label_smoothing=cfg.label_smoothing), train, val,
                                  FullData(len(train)), cfg, resume=resumed, precision=precision)
    if not distributed.is_main():
        if teach is not None:
            teach()
        return None
    with tracking.start_run("teacher", f"teacher-{cfg.model}", run_id=resumed and resumed["mlflow_run_id"]) as run:
        tracking.log_params({"teacher": {**dataclasses.asdict(cfg), "precision_used": precision},
                             "data": dataclasses.asdict(params["data"]), "base": dataclasses.asdict(params["base"])})
        if not cfg.checkpoint:
            print(f"teacher: training in {precision} ({why})")
        if cfg.checkpoint:
            if not os.path.abspath(cfg.checkpoint).startswith(os.path.abspath("weights") + os.sep):
                print(f"note: teacher.checkpoint {cfg.checkpoint} is outside weights/: `dvc repro` will not notice "
                      "when it changes")
            load_weights(model, read_checkpoint(cfg.checkpoint)["state_dict"], cfg.checkpoint,
                         what="teacher.checkpoint", init_key="teacher.init")
            logits, labels = predict(model, val)
            best_epoch, val_acc = -1, (logits.argmax(1) == labels).float().mean().item()
            state, seconds = model.state_dict(), 0.0
        else:
            result = teach(callbacks=[tracking.log_epoch],
                           checkpoint=lambda state: point.save(state, mlflow_run_id=run.info.run_id))
            state, best_epoch, val_acc, seconds, history = (result.best_state, result.best_epoch,
                                                            result.best_val_acc, result.seconds, result.history)
        save_checkpoint(paths.out, cfg.model, len(data.classes), data.input_shape[0], state,
                        best_epoch=best_epoch, val_acc=val_acc, source=cfg.checkpoint or "trained")
        tracking.tag_checkpoint(paths.out)
        summary = {"val_acc": val_acc, "best_epoch": best_epoch, "train_seconds": seconds}
        tracking.log_metrics(summary)
        figure = curves.training_curves(history, f"{cfg.model} teacher"
                                         + (f" (loaded from {cfg.checkpoint}, not trained)" if cfg.checkpoint else ""))
        tracking.log_figure(figure, "training_curves.png", Path(paths.plots).with_suffix(".png"))
    write_json(paths.metrics, summary)
    write_csv(paths.plots, history, columns=["epoch", "train_loss", "train_acc", "val_acc", "lr", "epoch_seconds"])
    if point is not None:
        point.clear()
    return summary
