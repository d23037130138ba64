"""Shared by the benchmark scripts: one distill + evaluate run of the real pipeline stages with
params overrides, on the prepared data and the teacher that `dvc repro` produced."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import yaml

from kdcompress.tracking import file_sha
from pipeline import distill, evaluate

TEACHER = "artifacts/teacher/teacher.pt"  # what the distill stage reads by default


def teacher_sha(results: dict, results_path: Path) -> str:
    """The hash (tracking.file_sha) of the teacher `dvc repro` made; refuses to add runs to a results file whose
    runs (those that recorded one) were made with another teacher: a table must have one teacher."""
    if not Path(TEACHER).exists():
        raise SystemExit(f"{TEACHER}: not found; run `dvc repro train_teacher` first")
    sha = file_sha(TEACHER)
    other = {r["teacher_sha"] for r in results.values() if r.get("teacher_sha")} - {sha}
    if other:
        raise SystemExit(f"{results_path}: its runs used another teacher (sha {', '.join(sorted(other))}; {TEACHER} "
                         f"is {sha}); move the file away or restore that teacher")
    return sha


def run_student(name: str, out_root: Path, overrides: dict, params_path: str = "params.yaml") -> dict:
    """Distil and evaluate one student; returns test metrics + timing. Logged to MLflow as usual."""
    folder = out_root / name
    folder.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load(Path(params_path).read_text())
    for key, value in overrides.items():  # dotted keys, like `dvc exp run -S`
        *path, leaf = key.split(".")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", str(folder / "params.yaml")]
    code = distill.main(args + ["--out", str(folder / "student.pt"), "--last", str(folder / "student_last.pt"),
                                "--metrics", str(folder / "distill.json"), "--plots", str(folder / "history.csv"),
                                "--rounds", str(folder / "rounds.csv")])
    if code:
        raise SystemExit(f"{name}: distill failed")
    code = evaluate.main(args + ["--student", str(folder / "student.pt"), "--metrics", str(folder / "evaluate.json"),
                                 "--plots", str(folder)])
    if code:
        raise SystemExit(f"{name}: evaluate failed")
    fit = json.loads((folder / "distill.json").read_text())
    test = json.loads((folder / "evaluate.json").read_text())["student"]
    epochs = params["distill"]["epochs"]
    rounds = list(csv.DictReader((folder / "rounds.csv").open()))
    round_seconds = [float(r["round_seconds"]) for r in rounds if r.get("round_seconds")]
    return {**test, "train_seconds": fit["train_seconds"], "epoch_seconds": fit["train_seconds"] / epochs,
            "samples_seen": fit["samples_seen"], "rounds": len(round_seconds),
            "round_seconds": statistics.fmean(round_seconds) if round_seconds else 0.0}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
