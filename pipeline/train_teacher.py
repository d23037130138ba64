"""Stage 2: train the teacher with the shared fit() loop (best checkpoint on val), or load the
user's own weights from ``teacher.checkpoint``."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import torch

from kdcompress import distributed, figures, tracking
from kdcompress.checkpoint import load_weights, read_checkpoint, save_checkpoint
from kdcompress.data import load_prepared
from kdcompress.distiller import Distiller
from kdcompress.io import write_csv, write_json
from kdcompress.selection import FullData
from kdcompress.train import fit, predict
from pipeline._common import build_model, loader, resume_point, setup, stage


@stage
def main(argv=None):
    args, params, device = setup(argv, "train_teacher", data="artifacts/data", out="artifacts/teacher/teacher.pt",
                                 resume="artifacts/resume/train_teacher.pt",
                                 metrics="artifacts/metrics/teacher.json", plots="artifacts/plots/teacher_history.csv")
    cfg = params["teacher"]
    data = load_prepared(args.data, splits=("val",) if cfg.checkpoint else ("train", "val"))
    meta = {"classes": data.classes, "input_shape": data.input_shape, "mean": data.mean, "std": data.std}
    model = build_model(cfg.model, len(data.classes), data.input_shape[0])
    val = loader(data.val, meta, device, cfg.eval_batch_size)
    model.to(device, memory_format=torch.channels_last)
    history, point, teach, resumed = [], None, None, None
    if not cfg.checkpoint:
        point, resumed = resume_point(args.resume, "train_teacher", params, ("base", "teacher"), [args.data])
        train = loader(data.train, meta, device, cfg.batch_size, crop_padding=cfg.crop_padding, hflip=cfg.hflip,
                       seed=params["base"].seed)
        teach = functools.partial(fit, Distiller(model, label_smoothing=cfg.label_smoothing), train, val,
                                  FullData(len(train)), cfg, resume=resumed, precision=params["base"].precision)
    if not distributed.is_main():  # the other ranks train their share of every batch and write nothing
        if teach is not None:
            teach()
        return
    with tracking.start_run("teacher", f"teacher-{cfg.model}", run_id=resumed and resumed["mlflow_run_id"]) as run:
        tracking.log_params({"teacher": dataclasses.asdict(cfg), "data": dataclasses.asdict(params["data"]),
                             "base": dataclasses.asdict(params["base"])})
        if cfg.checkpoint:
            if not os.path.abspath(cfg.checkpoint).startswith(os.path.abspath("weights") + os.sep):
                print(f"note: teacher.checkpoint {cfg.checkpoint} is outside weights/: `dvc repro` will not notice "
                      "when it changes")
            load_weights(model, read_checkpoint(cfg.checkpoint)["state_dict"], cfg.checkpoint)
            logits, labels = predict(model, val)
            best_epoch, val_acc = -1, (logits.argmax(1) == labels).float().mean().item()
            state, seconds = model.state_dict(), 0.0
        else:
            result = teach(callbacks=[tracking.log_epoch],
                           checkpoint=lambda state: point.save(state, mlflow_run_id=run.info.run_id))
            state, best_epoch, val_acc, seconds, history = (result.best_state, result.best_epoch,
                                                            result.best_val_acc, result.seconds, result.history)
        save_checkpoint(args.out, cfg.model, len(data.classes), data.input_shape[0], state,
                        best_epoch=best_epoch, val_acc=val_acc, source=cfg.checkpoint or "trained")
        tracking.tag_checkpoint(args.out)
        summary = {"val_acc": val_acc, "best_epoch": best_epoch, "train_seconds": seconds}
        tracking.log_metrics(summary)
        curves = figures.training_curves(history, f"{cfg.model} teacher"
                                         + (f" (loaded from {cfg.checkpoint}, not trained)" if cfg.checkpoint else ""))
        tracking.log_figure(curves, "training_curves.png", Path(args.plots).with_suffix(".png"))
    write_json(args.metrics, summary)
    write_csv(args.plots, history, columns=["epoch", "train_loss", "train_acc", "val_acc", "lr", "epoch_seconds"])
    if point is not None:
        point.clear()
    print(f"teacher {cfg.model}: val_acc {val_acc:.4f} ({seconds:.0f}s) -> {Path(args.out)}")


if __name__ == "__main__":
    raise SystemExit(main())
