"""Decisions are made on val; test is only reported: perturbing only the test split (its figures, or its
images and labels) changes neither what the int8 gate passes, nor what ships, nor what the leaderboard picks."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import ROOT, make_split

from kdcompress.common.onnx import ort_predict, save_onnx, to_onnx
from kdcompress.data.loader import make_loader
from kdcompress.data.prepared import Prepared, Split, save_prepared
from kdcompress.deploy import int8_search
from kdcompress.deploy.export import metadata_for
from kdcompress.deploy.ship import decide, summary
from kdcompress.report.leaderboard import best_under, mark_front, points
from models import create_model
from pipeline import quantize as quantize_stage

CLASSES, SHAPE = ["a", "b", "c", "d"], [1, 16, 16]


def split_figures(fp32: float, int8: float) -> dict:
    return {"fp32_top1": fp32, "int8_top1": int8, "drop_points": 100 * (fp32 - int8), "agreement": 0.9, "samples": 50}


def quant(val: tuple[float, float], test: tuple[float, float]) -> dict:
    """A student's quantize.json entry as the stage writes it: the gate's verdict from the val figures."""
    drop = 100 * (val[0] - val[1])
    return {"val": split_figures(*val), "test": split_figures(*test), "max_drop_points": 0.5, "passed": drop <= 0.5}


def other_test(result: dict, rng: random.Random) -> dict:
    """``result`` with every test figure replaced at random."""
    test = {**split_figures(rng.random(), rng.random()), "agreement": rng.random(), "samples": rng.randint(1, 99)}
    return {**result, "test": test}


BENCH = {role: {p: {"ort_edge": {"p50_ms": ms}, "file_bytes": 2048} for p, ms in (("fp32", 0.3), ("int8", 0.15))}
         for role in ("student", "teacher")}


@pytest.mark.parametrize("val, test, fp32_ms, int8_ms, ships", [
    ((0.90, 0.899), (0.90, 0.80), 0.30, 0.15, "int8"),  # passes on val, would fail on test
    ((0.90, 0.85), (0.85, 0.90), 0.30, 0.15, "fp32"),  # fails on val, would pass on test
    ((0.90, 0.899), (0.90, 0.90), 0.02, 0.03, "fp32"),  # passes but not faster
])
def test_test_figures_never_change_what_ships(val, test, fp32_ms, int8_ms, ships):
    result, rng = quant(val, test), random.Random(0)
    precision, reason = decide(result, fp32_ms, int8_ms)
    assert precision == ships and "val int8 top-1" in reason and "test" not in reason
    evaluation = {"student": {"ece": 0.01, "agreement": 0.9}, "teacher": {"top1": 0.93}}
    figures = summary(precision, evaluation, result, BENCH)
    assert figures["val"] == {"top1": val[0] if precision == "fp32" else val[1]}
    assert figures["test"]["top1"] == (test[0] if precision == "fp32" else test[1])
    for _ in range(200):
        perturbed = other_test(result, rng)
        assert decide(perturbed, fp32_ms, int8_ms) == (precision, reason)
        assert {k: v for k, v in summary(precision, evaluation, perturbed, BENCH).items() if k != "test"} == \
            {k: v for k, v in figures.items() if k != "test"}


def mlflow_run(name: str, val: float, test: float, fp32_ms: float, int8_ms: float, passed: bool) -> dict:
    """A benchmarked student run as tracking.runs() gives it: val and test top-1 of fp32 (int8 0.2 points
    below), the latencies, the gate's verdict and the test metrics of the evaluate stage."""
    metrics = {"test.top1": test}
    for role, v, t, ms in (("student", val, test, (fp32_ms, int8_ms)), ("teacher", 0.93, 0.92, (0.5, 0.25))):
        metrics[f"quantize.{role}.passed"] = float(passed)
        for precision, p50, offset in (("fp32", ms[0], 0.0), ("int8", ms[1], 0.002)):
            metrics[f"quantize.{role}.val.{precision}_top1"] = v - offset
            metrics[f"quantize.{role}.test.{precision}_top1"] = t - offset
            metrics[f"benchmark.{role}.{precision}.ort_edge.p50_ms"] = p50
            metrics[f"benchmark.{role}.{precision}.file_bytes"] = 1024 * (40 if precision == "fp32" else 15)
    return {"run_id": f"{name}000000", "run_name": name, "start_time": 0, "metrics": metrics,
            "tags": {"kdcompress.student": name, "kdcompress.method": "kd", "kdcompress.teacher_sha": "abc"}}


def test_test_figures_never_change_what_the_leaderboard_picks():
    runs = [mlflow_run("tiny", 0.88, 0.95, 0.03, 0.04, True), mlflow_run("wide", 0.91, 0.86, 0.06, 0.05, True),
            mlflow_run("mid", 0.90, 0.97, 0.04, 0.02, False), mlflow_run("big", 0.93, 0.80, 0.20, 0.10, True)]
    budgets = [(None, None), (0.055, None), (0.045, None), (None, 20.0), (0.001, None)]

    def choices(runs):
        pts = mark_front(points(runs))
        front = sorted((p.name, p.precision) for p in pts if p.on_front)
        picks = [best_under(pts, ms, kib) for ms, kib in budgets]
        return front, [(p.name, p.precision) if p else None for p in picks]

    front, picks = choices(runs)
    assert [p and p[0].split()[0] for p in picks] == ["big", "wide", "mid", "big", None]  # by val top-1
    assert picks[2] == ("mid kd #mid000", "fp32")  # its int8 failed the gate
    rng = random.Random(0)
    for _ in range(100):
        perturbed = [{**r, "metrics": {k: rng.random() if k.startswith("test.") or ".test." in k else v
                                       for k, v in r["metrics"].items()}} for r in runs]
        assert choices(perturbed) == (front, picks)


def export(model, path):
    meta = metadata_for("student", model.arch, CLASSES, [0.5], [0.25], SHAPE, 18)
    return save_onnx(to_onnx(model.eval(), SHAPE, 18, meta), path)


@pytest.mark.slow
def test_the_quantize_stage_gates_on_val_and_only_reports_test(tmp_path, monkeypatch):
    """The int8 student of a net with +1000 on every class's bias disagrees with its fp32 twin on many
    images: test labels set to the fp32 predictions make int8 fail on test, set to the int8 predictions
    make it pass; the gate's verdict and the val figures do not move, and neither does what ships."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # the int8 search's timings are the one thing that differs between the runs: make them fixed
    monkeypatch.setattr(int8_search, "block_runs", lambda *a: 1)
    monkeypatch.setattr(int8_search, "time_models", lambda paths, *a: {n: float(len(n)) for n in paths})
    torch.manual_seed(0)
    teacher, student = create_model("tinycnn", len(CLASSES), 1), create_model("tinycnn", len(CLASSES), 1)
    with torch.no_grad():
        student.head.bias += 1000.0
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    export(teacher, onnx_dir / "teacher.onnx")
    export(student, onnx_dir / "student.onnx")
    checkpoint = tmp_path / "student.pt"
    checkpoint.write_bytes(b"checkpoint")
    folder, metrics = tmp_path / "data", tmp_path / "quantize.json"
    splits = {name: make_split(n, len(CLASSES), 1, 16, seed) for name, n, seed in
              (("train", 64, 0), ("val", 48, 1), ("test", 48, 2))}

    def data(test: Split) -> Prepared:
        return Prepared(**{**splits, "test": test}, classes=CLASSES, mean=[0.5], std=[0.25])

    def run(test: Split) -> dict:
        save_prepared(data(test), folder)
        assert quantize_stage.main(["--params", str(ROOT / "params.yaml"), "--data", str(folder), "--onnx",
                                    str(onnx_dir), "--student", str(checkpoint), "--metrics", str(metrics)]) == 0
        return json.loads(metrics.read_text())

    original = run(splits["test"])
    assert original["student"]["val"]["samples"] == original["student"]["test"]["samples"] == 48
    other = make_split(48, len(CLASSES), 1, 16, seed=7)  # other test images, labelled two ways below
    batches = [x.numpy() for x, _, _ in make_loader(data(other), "test", "cpu", 64).batches()]
    preds = {p: ort_predict(onnx_dir / name, batches).argmax(1)
             for p, name in (("fp32", "student.onnx"), ("int8", "student.int8.onnx"))}
    assert (preds["fp32"] != preds["int8"]).mean() > 0.05
    reports = [run(Split(other.images, torch.from_numpy(preds[p]).long())) for p in ("fp32", "int8")]
    assert reports[0]["student"]["test"]["drop_points"] > 0.5 >= reports[1]["student"]["test"]["drop_points"]
    def without_test(entry: dict) -> dict:  # test figures may move; nothing else may
        out = {k: v for k, v in entry.items() if k != "test"}
        if "compared" in out:
            out["compared"] = {n: {k: v for k, v in c.items() if not k.startswith("test")}
                               for n, c in out["compared"].items()}
        return out

    for report in reports:
        for role in ("student", "teacher"):
            assert without_test(report[role]) == without_test(original[role])
        assert decide(report["student"], 0.3, 0.15) == decide(original["student"], 0.3, 0.15)
