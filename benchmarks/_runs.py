"""Shared by the benchmark scripts: one distill + evaluate run of the real pipeline stages with
params overrides, on the prepared data that `dvc repro` produced and its teacher (or a pinned one)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import yaml

from kdcompress.io import atomic_write
from kdcompress.tracking import file_sha
from pipeline import distill, evaluate

TEACHER = "artifacts/teacher/teacher.pt"  # what the distill stage reads by default


def pin_teacher(results: dict, results_path: Path) -> tuple[Path, str]:
    """The teacher every run of a results file uses, and its hash (tracking.file_sha): ``<name>_teacher.pt``
    beside the results, committed with them. Training the teacher again on another machine gives other
    weights (CPU kernels differ), so a table filled in over several sessions needs its teacher kept.
    Pinned from the teacher `dvc repro` made when a results file starts; refuses to add runs to a
    results file whose runs (those that recorded one) were made with another teacher."""
    pinned = results_path.with_name(results_path.stem + "_teacher.pt")
    if not pinned.exists():
        if results:
            raise SystemExit(f"{pinned}: not found, but {results_path} has runs; restore it (git checkout) "
                             "or move the results away to start a new table")
        if not Path(TEACHER).exists():
            raise SystemExit(f"{TEACHER}: not found; run `dvc repro train_teacher` first")
        atomic_write(pinned, Path(TEACHER).read_bytes())
    sha = file_sha(pinned)
    other = {r["teacher_sha"] for r in results.values() if r.get("teacher_sha")} - {sha}
    if other:
        raise SystemExit(f"{results_path}: its runs used another teacher (sha {', '.join(sorted(other))}; {pinned} "
                         f"is {sha}); move the results away or restore that teacher")
    return pinned, sha


def run_student(name: str, out_root: Path, overrides: dict, params_path: str = "params.yaml",
                teacher: str | Path = TEACHER) -> dict:
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
    args = ["--params", str(folder / "params.yaml"), "--teacher", str(teacher)]
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
