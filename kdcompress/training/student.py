"""The distill stage as one function: a Distiller (student + frozen teacher + the chosen KD loss, with
fixed or spot-adaptive spots) and a sample selector (all samples, or SAKD), trained by the shared
fit() loop, with its MLflow run, resume point, checkpoint, metrics and plots."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from kdcompress.common import distributed, tracking
from kdcompress.common.checkpoint import build_model, init_weights, load_model, save_checkpoint
from kdcompress.data.loader import fit_loaders
from kdcompress.data.prepared import load_prepared
from kdcompress.io import save_figure, write_csv, write_json
from kdcompress.methods import build_loss, check_methods
from kdcompress.runtime import resolve_device, resolve_precision
from kdcompress.training import curves
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit
from kdcompress.training.ort_teacher import OrtTeacher, use_ort_teacher
from kdcompress.training.resume import resume_point
from kdcompress.training.routing import build_router, routing_history
from kdcompress.training.selection.build import build_selector, int8_calibration
from kdcompress.training.teacher_cache import TeacherCache, for_run, teacher_runtime
from kdcompress.types import UserError


def teacher_caches(params: dict, paths: SimpleNamespace, teacher, device: torch.device, num_samples: int,
                   parts: frozenset[str] | None, precision: str) -> tuple[TeacherCache | None, TeacherCache | None]:
    """The run's teacher-output caches (None: off): of the training view (augmented, under fit()'s
    autocast in ``precision``), and of SAKD's first difficulty pass (clean images, outside autocast, the
    same for every run of a sweep). Their keys take only what can change the teacher's outputs (``for_run``)."""
    cfg, seed = params["distill"], params["base"].seed
    if not cfg.teacher_cache or distributed.world()[1] > 1:  # ranks would each store their share
        return None, None
    cache = clean = None
    if TeacherCache.usable(parts):
        cache = for_run(paths.teacher, paths.data, teacher, device, num_samples, parts,
                        autocast=precision, seed=seed, crop_padding=cfg.crop_padding, hflip=cfg.hflip)
    if cfg.sampling == "sakd":
        clean = for_run(paths.teacher, paths.data, teacher, device, num_samples, frozenset({"logits", "embedding"}),
                        int8=int8_calibration(params["sakd"], params["quantize"], seed))
    return cache, clean


def distill(params: dict, paths: SimpleNamespace, create_model: Callable) -> dict | None:
    """Distil the student; ``paths`` has data, teacher, out, resume, metrics, plots, rounds and
    routing. Returns the summary on the main process (None on the others, which train their share
    of every batch and write nothing)."""
    device = distributed.init(resolve_device(params["base"].device))
    cfg, seed = params["distill"], params["base"].seed
    check_methods(params["methods"])
    loss = build_loss(cfg.method, params["methods"].get(cfg.method))
    if cfg.sampling != "full" and (loss is None or not loss.selects_samples):
        raise UserError(f"distill.sampling: {cfg.sampling!r} needs a method that distils on the real samples; "
                        f"method {cfg.method!r} allows: full")
    if loss is None and (cfg.ce_weight is not None or cfg.kd_weight is not None):
        raise UserError("distill.ce_weight / distill.kd_weight: method 'ce' trains on cross-entropy alone; "
                        "allowed: null (or pick a distillation method)")
    world = distributed.world()[1]
    if world > 1 and cfg.method == "data_free":
        raise UserError(f"base.nproc: {world} processes do not run method 'data_free' yet (every process would "
                        "generate the same images); allowed: base.nproc: 1")
    router = build_router(cfg.spots, loss, params["routing"], world)
    ort_teacher = use_ort_teacher(cfg.teacher_runtime, loss, device)
    data = load_prepared(paths.data, splits=("train", "val"))
    student = build_model(create_model, cfg.student, len(data.classes), data.input_shape[0])
    if cfg.student_init:
        init_weights(student, cfg.student_init, "distill.student_init")
    student = student.to(device, memory_format=torch.channels_last)
    teacher = None
    if (loss is not None and loss.needs_teacher) or cfg.sampling != "full":
        teacher = load_model(paths.teacher, device, create_model, data)
        if ort_teacher:
            teacher = OrtTeacher(teacher, data.input_shape, opset=params["export"].opset, atol=params["export"].atol)
    distiller = Distiller(student, teacher, loss, cfg.ce_weight, cfg.kd_weight, cfg.label_smoothing, router)
    runtime = teacher_runtime(teacher)
    parts = loss.teacher_parts() if teacher is not None else None
    if router is not None:
        parts |= router.teacher_parts()
    precision, why = resolve_precision(cfg.precision, student, device)
    distiller.cache, clean_cache = teacher_caches(params, paths, teacher, device, len(data.train), parts, precision)
    train, val = fit_loaders(data, device, cfg, params["data"].workers, seed)
    # SAKD's difficulty pass batches like training (measured 1.4x faster than batch 1024 on 2 CPU cores),
    # over the training loader's tensors: no second copy of the training set on the device
    selector = build_selector(cfg.sampling, params["sakd"], distiller, train.view(cfg.batch_size),
                              epochs=cfg.epochs, seed=seed, clean_cache=clean_cache,
                              quant=params["quantize"])
    logged = {"distill": {**dataclasses.asdict(cfg), "precision_used": precision},
              "base": dataclasses.asdict(params["base"]),
              f"methods.{cfg.method}": params["methods"].get(cfg.method, {})}
    if cfg.sampling == "sakd":
        logged["sakd"] = dataclasses.asdict(params["sakd"])
    elif cfg.sampling == "random":
        logged["sakd"] = {"ratio": params["sakd"].ratio, "interval": params["sakd"].interval}
    if router is not None:
        logged["routing"] = dataclasses.asdict(params["routing"])
    point, resumed = resume_point(paths.resume, "distill", params, ("base", "distill", "methods", "sakd", "routing"),
                                  [paths.data, *([paths.teacher] if teacher is not None else []),
                                   *([cfg.student_init] if cfg.student_init else [])], precision=precision)
    if not distributed.is_main():  # the other ranks train their share of every batch and write nothing
        fit(distiller, train, val, selector, cfg, resume=resumed, precision=precision)
        return None
    tags = {"kdcompress.method": cfg.method, "kdcompress.student": cfg.student, "kdcompress.sampling": cfg.sampling,
            "kdcompress.spots": cfg.spots, "kdcompress.teacher_runtime": runtime}
    with tracking.start_run("student", f"{cfg.student}-{cfg.method}-{cfg.sampling}", tags,
                            run_id=resumed and resumed["mlflow_run_id"]) as run:
        tracking.log_params(logged)
        print(f"distill: training in {precision} ({why})")
        result = fit(distiller, train, val, selector, cfg, callbacks=[tracking.log_epoch], resume=resumed,
                     checkpoint=lambda state: point.save(state, mlflow_run_id=run.info.run_id),
                     precision=precision)
        save_checkpoint(paths.out, cfg.student, len(data.classes), data.input_shape[0], result.best_state,
                        best_epoch=result.best_epoch, val_acc=result.best_val_acc, method=cfg.method)
        tracking.tag_checkpoint(paths.out)
        summary = {"val_acc": result.best_val_acc, "best_epoch": result.best_epoch, "train_seconds": result.seconds,
                   "samples_seen": sum(h["samples"] for h in result.history)}
        if distiller.cache is not None:
            print(distiller.cache.summary())
            summary["teacher_cache_hit_fraction"] = distiller.cache.hits / max(1, distiller.cache.hits
                                                                                + distiller.cache.misses)
        tracking.log_metrics(summary)
        figure = curves.training_curves(result.history, f"{cfg.student} student ({cfg.method}, {cfg.sampling})")
        tracking.log_figure(figure, "training_curves.png", Path(paths.plots).with_suffix(".png"))
        write_csv(paths.rounds, selector.history or [{"epoch": None}])
        if selector.history:
            tracking.log_artifact(paths.rounds)
        routing = routing_history(result.history) if router is not None else []
        write_csv(paths.routing, routing or [{"epoch": None}])
        figure = curves.spot_routing(routing, f"{cfg.student} student ({cfg.method}, {cfg.spots} spots)")
        if router is not None:
            tracking.log_figure(figure, "spot_routing.png", Path(paths.routing).with_suffix(".png"))
            tracking.log_artifact(paths.routing)
        else:  # the DVC plot exists for every run; MLflow shows it where there is routing
            save_figure(figure, Path(paths.routing).with_suffix(".png"))
    write_json(paths.metrics, summary)
    write_csv(paths.plots, result.history, columns=["epoch", "train_loss", "train_acc", "val_acc", "lr", "samples",
                                                   "epoch_seconds"])
    point.clear()
    return summary
