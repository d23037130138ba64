"""Shared by the benchmark scripts: one distill + evaluate run of the real pipeline stages with
params overrides, on the prepared data that `dvc repro` produced and its teacher (or a pinned one)."""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import yaml

from kdcompress.io import atomic_write, file_sha, write_json
from pipeline import benchmark, distill, evaluate, export, quantize
from pipeline import ship as ship_stage
from pipeline import train_teacher as teacher_stage

TEACHER = "artifacts/teacher/teacher.pt"  # what the distill stage reads by default
# The sweeps' distillation schedule unless -S distill.epochs=N: the 10 epochs their committed tables were
# made with (the pipeline's default is longer), so a resumed table keeps one schedule.
SWEEP_EPOCHS = 10


def sweep_arguments(p: argparse.ArgumentParser, seeds: list[int]) -> None:
    """The options every benchmark sweep shares: seeds, side-by-side jobs, params overrides, results folder."""
    p.add_argument("--seeds", nargs="+", type=int, default=seeds)
    p.add_argument("--jobs", type=int, default=1, help="students trained side by side (cores are shared out)")
    p.add_argument("-S", dest="overrides", action="append", default=[], help="key=value, as for dvc exp run -S")
    p.add_argument("--out", default="benchmarks/results")


def read_sweep(args: argparse.Namespace, name: str) -> tuple[dict, Path, dict]:
    """``(overrides, results_path, results)`` of a sweep: the -S overrides parsed as YAML values (over
    ``distill.epochs: SWEEP_EPOCHS``) and the finished runs kept in ``<out>/<name>.json`` (empty when it starts)."""
    overrides = {"distill.epochs": SWEEP_EPOCHS,
                 **{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}}
    results_path = Path(args.out) / f"{name}.json"
    return overrides, results_path, json.loads(results_path.read_text()) if results_path.exists() else {}


def pin_teacher(results: dict, results_path: Path, source: Callable[[], Path] | None = None) -> tuple[Path, str]:
    """The teacher every run of a results file uses, and its hash (tracking.file_sha): ``<name>_teacher.pt``
    beside the results, committed with them. Training the teacher again on another machine gives other
    weights (CPU kernels differ), so a table filled in on several machines, or across restarts, needs its teacher kept.
    Pinned when a results file starts, from ``source()`` (default: the teacher `dvc repro` made);
    refuses to add runs to a results file whose runs (those that recorded one) were made with another teacher."""
    pinned = results_path.with_name(results_path.stem + "_teacher.pt")
    if not pinned.exists():
        if results:
            raise SystemExit(f"{pinned}: not found, but {results_path} has runs; restore it (git checkout) "
                             "or move the results away to start a new table")
        made = Path(source() if source else TEACHER)
        if not made.exists():
            raise SystemExit(f"{made}: not found" + ("" if source else "; run `dvc repro train_teacher` first"))
        atomic_write(pinned, made.read_bytes())
    sha = file_sha(pinned)
    other = {r["teacher_sha"] for r in results.values() if r.get("teacher_sha")} - {sha}
    if other:
        raise SystemExit(f"{results_path}: its runs used another teacher (sha {', '.join(sorted(other))}; {pinned} "
                         f"is {sha}); move the results away or restore that teacher")
    return pinned, sha


def write_params(folder: Path, overrides: dict, params_path: str = "params.yaml") -> dict:
    """``params_path`` with ``overrides`` (dotted keys, like `dvc exp run -S`) written to ``folder/params.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load(Path(params_path).read_text())
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def train_teacher(model: str, folder: Path, params_path: str = "params.yaml", overrides: dict | None = None) -> Path:
    """A teacher of architecture ``model`` trained by the train_teacher stage (the other params as they are,
    with ``overrides``) on the prepared data, in ``folder``; an interrupted training resumes."""
    write_params(folder, {**(overrides or {}), "teacher.model": model}, params_path)
    out = folder / "teacher.pt"
    if not out.exists() and teacher_stage.main([
            "--params", str(folder / "params.yaml"), "--out", str(out), "--resume", str(folder / "resume.pt"),
            "--metrics", str(folder / "teacher.json"), "--plots", str(folder / "history.csv")]):
        raise SystemExit(f"{model} teacher: train_teacher failed")
    return out


def run_student(name: str, out_root: Path, overrides: dict, params_path: str = "params.yaml",
                teacher: str | Path = TEACHER, ship: bool = False) -> dict:
    """Distil and evaluate one student (and with ``ship``, export, quantize and benchmark it too);
    returns test metrics (and the teacher's top-1), the val top-1 of the kept checkpoint (decisions go by
    it) and timing. Logged to MLflow as usual. A step whose output the run's folder already holds (from an
    interrupted run with the same name) is not run again."""
    folder = out_root / name
    params = write_params(folder, overrides, params_path)
    params_arg, teacher_arg = ["--params", str(folder / "params.yaml")], ["--teacher", str(teacher)]
    student = ["--student", str(folder / "student.pt")]
    files = {f: str(folder / f) for f in ("distill.json", "evaluate.json", "export.json", "quantize.json",
                                          "benchmark.json", "summary.json", "onnx", "ship")}
    steps = [(distill, "distill.json", params_arg + teacher_arg + [
                 "--out", str(folder / "student.pt"), "--resume", str(folder / "resume.pt"), "--metrics",
                 files["distill.json"], "--plots", str(folder / "history.csv"),
                 "--rounds", str(folder / "rounds.csv"), "--routing", str(folder / "routing.csv")]),
             (evaluate, "evaluate.json", params_arg + teacher_arg + student + [
                 "--metrics", files["evaluate.json"], "--plots", str(folder)])]
    if ship:
        steps += [(export, "export.json", params_arg + teacher_arg + student + [
                      "--out", files["onnx"], "--metrics", files["export.json"]]),
                  (quantize, "quantize.json", params_arg + teacher_arg + student + [
                      "--onnx", files["onnx"], "--metrics", files["quantize.json"]]),
                  (benchmark, "benchmark.json", params_arg + student + ["--onnx", files["onnx"], "--metrics",
                                                                        files["benchmark.json"]]),
                  (ship_stage, "summary.json", student + [
                      "--onnx", files["onnx"], "--evaluation", files["evaluate.json"],
                      "--export", files["export.json"], "--quantization", files["quantize.json"],
                      "--benchmark", files["benchmark.json"], "--out", files["ship"],
                      "--metrics", files["summary.json"]])]
    for stage, output, stage_args in steps:
        if not (folder / output).exists() and stage.main(stage_args):
            raise SystemExit(f"{name}: {stage.__name__.rsplit('.', 1)[-1]} failed")
    fit = json.loads((folder / "distill.json").read_text())
    evaluation = json.loads((folder / "evaluate.json").read_text())
    test = evaluation["student"]
    epochs = params["distill"]["epochs"]
    rounds = list(csv.DictReader((folder / "rounds.csv").open()))
    round_seconds = [float(r["round_seconds"]) for r in rounds if r.get("round_seconds")]
    detail = ("epoch", "alpha_selected_mean", "alpha_mean", "teacher_seconds", "student_seconds", "dpp_seconds",
              "round_seconds")
    result = {**test, "teacher_top1": evaluation["teacher"]["top1"], "val_top1": fit["val_acc"],
              "train_seconds": fit["train_seconds"], "epoch_seconds": fit["train_seconds"] / epochs,
              "samples_seen": fit["samples_seen"], "rounds": len(round_seconds),
              "teacher_cache_hit_fraction": fit.get("teacher_cache_hit_fraction"),
              "round_seconds": statistics.fmean(round_seconds) if round_seconds else 0.0,
              "round_detail": [{k: float(r[k]) for k in detail if r.get(k)} for r in rounds if r.get("round_seconds")],
              "routing": [{k: float(v) for k, v in r.items() if v}
                          for r in csv.DictReader((folder / "routing.csv").open()) if r.get("epoch")]}
    if ship:
        result["ship"] = json.loads((folder / "summary.json").read_text())
        result["quantize"] = json.loads((folder / "quantize.json").read_text())
        result["benchmark"] = json.loads((folder / "benchmark.json").read_text())
    return result


def run_all(tasks: dict[str, tuple[str, dict]], out_root: Path, jobs: int, teacher: str | Path, extra: dict,
            results: dict, results_path: Path, after=None) -> None:
    """Run ``tasks`` (results key -> (run name, overrides)) with ``jobs`` students side by side (each
    with cores/jobs threads, in spawned processes); each finished run goes into ``results`` with
    ``extra`` and ``jobs`` and is written to ``results_path`` at once, then ``after()`` runs (a table).
    A failed run is reported at the end and not recorded, so a rerun retries it."""
    threads = {"base.num_threads": max(1, (os.cpu_count() or 1) // jobs)} if jobs > 1 else {}
    failed = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {pool.submit(run_student, name, out_root, {**overrides, **threads}, teacher=teacher): key
                   for key, (name, overrides) in tasks.items()}
        for done in as_completed(running):
            try:
                results[running[done]] = {**done.result(), **extra, "jobs": jobs}
            except (Exception, SystemExit) as err:  # keep going; a rerun retries what failed
                failed.append(f"{running[done]}: {err}")
                continue
            write_json(results_path, results)  # only this process writes them
            if after is not None:
                after()
    if failed:
        raise SystemExit("failed runs (not recorded): " + "; ".join(failed))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
