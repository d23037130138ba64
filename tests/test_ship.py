"""int8 behind its gate, the shipping decision both ways, and the leaderboard on a small MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT

from kdcompress.common import tracking
from kdcompress.common.int8 import int8_path, quantize
from kdcompress.common.onnx import ort_predict, save_onnx, to_onnx
from kdcompress.deploy.export import metadata_for
from kdcompress.deploy.quantize import accuracy, gate
from kdcompress.deploy.ship import decide
from kdcompress.report.leaderboard import Point, best_under, mark_front
from models import create_model
from pipeline import benchmark as benchmark_stage
from pipeline import leaderboard, ship
from pipeline import quantize as quantize_stage

SHAPE, CLASSES = [1, 16, 16], ["a", "b", "c", "d"]


def export(model, path: Path) -> Path:
    meta = metadata_for("student", model.arch, CLASSES, [0.5], [0.25], SHAPE, 18)
    return save_onnx(to_onnx(model.eval(), SHAPE, 18, meta), path)


def images(n: int, seed: int) -> np.ndarray:
    """Noise with one bright quadrant, the quadrant being the class (n // 4 of each)."""
    x = np.random.default_rng(seed).standard_normal((n, *SHAPE), dtype=np.float32)
    for i in range(n):
        row, col = divmod(i % len(CLASSES), 2)
        x[i, :, 8 * row:8 * row + 8, 8 * col:8 * col + 8] += 1.5
    return x


def trained_tinycnn() -> torch.nn.Module:
    """A TinyCNN trained to tell the quadrants apart: its logits have margins int8 can keep (a random
    net's top two logits are ~0.01 apart, under int8's rounding, so its argmax is noise)."""
    torch.manual_seed(0)
    model = create_model("tinycnn", len(CLASSES), 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(60):
        x = torch.from_numpy(images(32, 100 + step))
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(32) % len(CLASSES))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A trained TinyCNN and the same net with +100,000 on every class's bias (the same argmax in fp32, but
    int8 activations over [0, 1e5] cannot resolve the logits' differences): fp32 and int8 logits of both."""
    folder = tmp_path_factory.mktemp("quant")
    good = trained_tinycnn()
    bad = create_model("tinycnn", len(CLASSES), 1)
    bad.load_state_dict(good.state_dict())
    with torch.no_grad():
        bad.head.bias += 1e5
    test = [images(64, 1), images(64, 2)]
    out = {}
    for name, model in (("good", good), ("bad", bad)):
        fp32 = export(model, folder / f"{name}.onnx")
        int8 = quantize(fp32, int8_path(fp32), (images(32, 10 + i) for i in range(4)), "minmax")
        out[name] = (fp32, int8, ort_predict(fp32, test), ort_predict(int8, test))
    return out


def test_int8_twin_is_a_qdq_model_with_the_fp32_metadata(quantized):
    fp32, int8, _, _ = quantized["good"]
    assert int8.name == "good.int8.onnx" and int8.parent == fp32.parent
    model = onnx.load(str(int8))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["classes"] == json.dumps(CLASSES) and meta["kdcompress.precision"] == "int8"
    assert meta["kdcompress.calibration"] == "minmax"


def test_gate_passes_a_faithful_int8_model_and_fails_a_broken_one(quantized):
    _, _, fp32_logits, int8_logits = quantized["good"]
    labels = fp32_logits.argmax(1)  # the fp32 model is right by construction
    ok = accuracy(fp32_logits, int8_logits, labels)
    assert ok["fp32_top1"] == 1.0 and ok["agreement"] == ok["int8_top1"] >= 0.95 and gate(ok, 5.0)["passed"]

    _, _, fp32_bad, int8_bad = quantized["bad"]
    assert (fp32_bad.argmax(1) == labels).all()  # the offset does not change fp32 predictions
    failed = accuracy(fp32_bad, int8_bad, labels)
    assert not gate(failed, 5.0)["passed"] and failed["drop_points"] > 5.0 and failed["agreement"] < 0.95
    assert gate(ok, 0.0) == {"max_drop_points": 0.0, "passed": ok["int8_top1"] == 1.0}


def quant_result(val_drop: float, test_drop: float = 0.1) -> dict:
    """One role's quantize.json entry: fp32 at 90 % on val and 89 % on test, int8 ``*_drop`` points below."""
    def split(fp32, drop):
        return {"fp32_top1": fp32, "int8_top1": fp32 - drop / 100, "drop_points": drop, "agreement": 0.99,
                "samples": 100}
    return {"val": split(0.90, val_drop), "test": split(0.89, test_drop), "max_drop_points": 0.5,
            "passed": val_drop <= 0.5, "calibration": "minmax", "calibration_samples": 8, "per_channel": True}


GATE_OK, GATE_FAIL = quant_result(0.1), quant_result(2.0)


@pytest.mark.parametrize("gate_result, fp32_ms, int8_ms, shipped, why", [
    (GATE_OK, 0.30, 0.15, "int8", "2.00x faster"),
    (GATE_OK, 0.02, 0.03, "fp32", "but is not faster"),
    (GATE_FAIL, 0.30, 0.15, "fp32", "failed the accuracy gate"),
])
def test_shipping_decision(gate_result, fp32_ms, int8_ms, shipped, why):
    precision, reason = decide(gate_result, fp32_ms, int8_ms)
    assert precision == shipped and why in reason


def bench(fp32_ms: float, int8_ms: float) -> dict:
    def figures(ms):
        return {"ort_edge": {"p50_ms": ms, "p90_ms": ms, "p99_ms": ms}, "ort_server": {"images_per_s": 1000.0},
                "memory_edge": {"peak_rss_mib": 5.0}, "file_bytes": 2048}
    return {"student": {"fp32": figures(fp32_ms), "int8": figures(int8_ms)},
            "teacher": {"fp32": figures(1.0), "int8": figures(0.5)},
            "environment": {"onnxruntime": "1", "cpu": "cpu", "cpu_count": 2, "server_batch": 64}}


@pytest.mark.parametrize("int8_ms, files", [
    (0.1, ["MODEL_CARD.md", "model.fp32.onnx", "model.onnx", "predict.py"]),
    (0.3, ["MODEL_CARD.md", "model.onnx", "predict.py"]),
])
def test_ship_stage_copies_the_chosen_model(quantized, tmp_path, monkeypatch, int8_ms, files):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    fp32, int8, _, _ = quantized["good"]
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "student.onnx").write_bytes(fp32.read_bytes())
    (onnx_dir / "student.int8.onnx").write_bytes(int8.read_bytes())
    student = tmp_path / "student.pt"
    student.write_bytes(b"checkpoint")
    gates = {role: GATE_OK for role in ("student", "teacher")}
    metrics = {"student": {"top1": 0.9, "ece": 0.01, "agreement": 0.95}, "teacher": {"top1": 0.93}}
    export = {"student": {"params": 1234, "macs": 5e6, "samples": 64, "max_abs_diff": 1e-6, "top1_agreement": 1.0}}
    for name, value in (("q.json", gates), ("b.json", bench(0.2, int8_ms)), ("e.json", metrics),
                        ("x.json", export)):
        (tmp_path / name).write_text(json.dumps(value))
    out = tmp_path / "ship"
    (out / "stale").mkdir(parents=True)  # a previous ship folder is replaced whole
    args = ["--onnx", str(onnx_dir), "--student", str(student), "--evaluation", str(tmp_path / "e.json"),
            "--export", str(tmp_path / "x.json"), "--quantization", str(tmp_path / "q.json"),
            "--benchmark", str(tmp_path / "b.json"), "--out", str(out), "--metrics", str(tmp_path / "summary.json")]
    assert ship.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == files
    chosen = "int8" if "model.fp32.onnx" in files else "fp32"
    assert (out / "model.onnx").read_bytes() == {"fp32": fp32, "int8": int8}[chosen].read_bytes()
    text = (out / "MODEL_CARD.md").read_text()
    assert f"**Decision: {chosen}.**" in text and "1,234 parameters" in text
    assert "| top-1 on val (decision), ONNX | 90.00% | 89.90% |" in text
    assert "| top-1 on test (reported), ONNX | 89.00% | 88.90% |" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["int8_shipped"] == (chosen == "int8")
    assert summary["val"] == {"top1": GATE_OK["val"][f"{chosen}_top1"]}
    assert summary["test"]["top1"] == GATE_OK["test"][f"{chosen}_top1"] and summary["test"]["teacher_top1"] == 0.93
    assert summary["speedup_vs_teacher"] == pytest.approx(1 / int8_ms if chosen == "int8" else 1 / 0.2)
    assert not list(tmp_path.glob(".ship*"))  # no temporary folder left behind


def test_ship_stage_refuses_missing_inputs_in_one_line(tmp_path, capsys):
    assert ship.main(["--evaluation", str(tmp_path / "nope.json"), "--out", str(tmp_path / "ship")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("nope.json: not found (written by the evaluate stage; run it first)") and "\n" not in err
    assert not (tmp_path / "ship").exists()


@pytest.mark.parametrize("stage", [quantize_stage, benchmark_stage])
def test_a_garbage_or_missing_onnx_file_is_one_line(quantized, tmp_path, capsys, stage):
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "student.onnx").write_bytes(b"\x08\x07garbage, not a protobuf")
    (onnx_dir / "teacher.onnx").write_bytes(quantized["good"][0].read_bytes())
    metrics = tmp_path / "out.json"
    args = ["--params", str(ROOT / "params.yaml"), "--onnx", str(onnx_dir), "--metrics", str(metrics)]
    assert stage.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {onnx_dir / 'student.onnx'}: not a valid ONNX model (") and "\n" not in err
    (onnx_dir / "student.onnx").unlink()
    assert stage.main(args) == 2
    assert f"ONNX model not found: {onnx_dir / 'student.onnx'}" in capsys.readouterr().err
    assert not metrics.exists()


def test_front_and_budget():
    def pt(name, top1, ms, kib=10.0, shippable=True, role="student", shipped=True):
        return Point(name, role, "fp32", top1, 1 - top1, ms, kib, shippable, name, shipped and shippable)
    pts = mark_front([pt("fast", 0.88, 0.02), pt("mid", 0.90, 0.05), pt("dominated", 0.89, 0.06),
                      pt("broken", 0.95, 0.01, shippable=False), pt("big", 0.92, 0.20, kib=400),
                      pt("teacher", 0.93, 0.50, role="teacher")])
    assert [p.name for p in pts if p.on_front] == ["fast", "mid", "big", "teacher"]
    assert best_under(pts, 0.06, None).name == "mid"
    assert best_under(pts, None, 100).name == "mid"
    assert best_under(pts, None, None).name == "big"  # the teacher is never the answer
    assert best_under(pts, 0.01, None) is None
    not_shipped = mark_front([pt("slower int8", 0.905, 0.03, shipped=False), pt("its fp32", 0.90, 0.02)])
    assert best_under(not_shipped, 0.05, None).name == "its fp32"  # as the ship stage decided


def log_student(name: str, top1: float, ms: float, int8_ms: float, passed: bool,
                test_top1: float | None = None) -> None:
    """A benchmarked student run: val top-1 ``top1`` (fp32), test top-1 ``test_top1`` (default: the same)."""
    test_top1 = top1 if test_top1 is None else test_top1
    with tracking.start_run("student", name, {"kdcompress.student": name, "kdcompress.method": "kd",
                                              "kdcompress.teacher": "resnet20", "kdcompress.teacher_sha": "abc"}):
        test = {"top1": test_top1, "nll": 1 - test_top1, "ece": 0.01, "agreement": test_top1,
                "kl_teacher_student": 0.1, "logit_cosine": 0.9, "entropy": 0.3}
        tracking.log_metrics(test, prefix="test")
        drop = 0.001 if passed else 0.05
        tracking.log_metrics({role: {"val": {"fp32_top1": v, "int8_top1": v - drop},
                                     "test": {"fp32_top1": t, "int8_top1": t - drop}, "passed": passed}
                              for role, v, t in (("student", top1, test_top1), ("teacher", 0.93, 0.92))},
                             prefix="quantize")
        tracking.log_metrics({role: {p: {"ort_edge": {"p50_ms": v}, "file_bytes": 1024 * k}
                                     for p, v, k in (("fp32", f, 40), ("int8", i, 15))}
                              for role, f, i in (("student", ms, int8_ms), ("teacher", 0.5, 0.25))}, prefix="benchmark")


def test_leaderboard_on_a_small_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert leaderboard.main(["--out", str(tmp_path / "lb")]) == 2
    assert "no benchmarked student run" in capsys.readouterr().err
    log_student("tiny", 0.88, 0.03, 0.04, True, test_top1=0.95)  # the best on test: not what decides
    log_student("wide", 0.91, 0.06, 0.05, True, test_top1=0.87)
    log_student("fragile", 0.90, 0.10, 0.02, False)
    with tracking.start_run("student", "unbenchmarked"):
        tracking.log_metrics({"top1": 0.5}, prefix="test")

    out = tmp_path / "lb"
    assert leaderboard.main(["--out", str(out), "--target-latency-ms", "0.055"]) == 0
    printed = capsys.readouterr().out
    assert "best student under target_latency_ms 0.055, by val top-1: wide kd" in printed and "int8" in printed
    assert "(val top-1 90.90%, test top-1 86.90% reported," in printed
    best = json.loads((out / "best.json").read_text())["best"]
    assert best["precision"] == "int8" and best["p50_ms"] == 0.05
    assert best["val_top1"] == pytest.approx(0.909) and best["test_top1"] == pytest.approx(0.869)
    rows = (out / "pareto.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2 + 2  # three benchmarked students x 2 precisions + one teacher x 2
    front = [r for r in rows[1:] if r.endswith(",True")]
    assert all("fragile" not in r or ",fp32," in r for r in front)  # its int8 failed the gate
    ranks = (out / "ranks.md").read_text().splitlines()
    assert ranks[2].startswith("| tiny kd") and len(ranks) == 2 + 4  # test metrics; the unbenchmarked run too
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    runs = tracking.runs("leaderboard")
    assert len(runs) == 1 and runs[0]["tags"]["kdcompress.best"].endswith("int8")
    assert runs[0]["metrics"]["best.val.top1"] == pytest.approx(0.909)
    assert runs[0]["metrics"]["best.test.top1"] == pytest.approx(0.869)

    assert leaderboard.main(["--out", str(out), "--target-latency-ms", "0.001"]) == 0
    assert "no student fits target_latency_ms 0.001: the fastest is 0.0300 ms" in capsys.readouterr().out
    assert json.loads((out / "best.json").read_text())["best"] is None
