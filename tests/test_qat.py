"""Quantization-aware fine-tuning (kdcompress.training.qat): the fake quantizers compute what the int8
file computes, train through straight-through gradients and leave the model's structure as it was; the
quantize stage with quantize.qat_epochs fine-tunes a distilled student under its KD loss, adds the
fine-tuned model's int8 files to the search and checks one of them against the fake-quantized student."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from kdcompress.common.checkpoint import save_checkpoint
from kdcompress.common.int8 import Int8Config, Quantizer
from kdcompress.common.onnx import ort_predict, read_metadata, save_onnx, to_onnx
from kdcompress.data.prepared import Prepared, save_prepared
from kdcompress.deploy.export import metadata_for
from kdcompress.training import qat
from models import create_model
from pipeline import quantize as quantize_stage
from tests.conftest import make_split

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c", "d"]


def test_weights_fake_quantize_to_the_int8_grid_with_straight_through_gradients():
    conv = nn.Conv2d(2, 3, 3)
    original = conv.weight.detach().clone()
    qat.fake_quantize(conv)
    w = conv.weight
    scale = original.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert torch.allclose(w, (original / scale).round().clamp(-127, 127) * scale, atol=1e-7)
    assert not torch.equal(w, original)  # on the grid, not the weights themselves
    x = torch.randn(4, 2, 5, 5)
    conv(x).sum().backward()
    grad = conv.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0  # straight through the rounding


def test_inputs_follow_a_running_range_that_contains_zero_then_freeze():
    fq = qat.InputFakeQuant().train()
    x = torch.linspace(1.0, 3.0, 100)  # all positive: the range is widened to [0, 3]
    y = fq(x)
    assert fq.low.item() == 1.0 and fq.high.item() == 3.0
    step = 3.0 / 255
    assert torch.allclose(y, (x / step).round() * step, atol=1e-6) and (y - x).abs().max() <= step / 2 + 1e-6
    fq(torch.full((10,), 13.0))  # EMA: 1 % of the way to the new extremes
    assert fq.high.item() == pytest.approx(3.1) and fq.low.item() == pytest.approx(1.12)
    fq.eval()
    fq(torch.full((10,), 100.0))
    assert fq.high.item() == pytest.approx(3.1)  # frozen in eval mode


def test_strip_gives_back_the_structure_and_the_trained_weights():
    torch.manual_seed(0)
    model = create_model("mobilenet:16", len(CLASSES), 1)
    keys = set(model.state_dict())
    qat.fake_quantize(model)
    assert set(model.state_dict()) != keys
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    trained = {k.replace("parametrizations.weight.original", "weight"): v.clone()
               for k, v in model.state_dict().items() if "fake_quant" not in k}
    qat.strip(model)
    assert set(model.state_dict()) == keys
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    assert not any(layer._forward_pre_hooks for layer in model.modules() if isinstance(layer, qat.LAYERS))


def test_the_int8_file_computes_what_the_fake_quantized_model_does(tmp_path):
    """A model whose input ranges were set on the calibration images: its stripped weights as the quantize
    stage's static QDQ file (every op type, calibrated on the same images) agree with it on new images."""
    torch.manual_seed(0)
    model = create_model("mobilenet:16", len(CLASSES), 1)
    calibration = torch.randn(64, 1, 16, 16)
    qat.fake_quantize(model).train()
    for _ in range(300):  # the EMA of the batches' extremes settles on the calibration set's
        model(calibration)
    model.eval()
    x = torch.randn(256, 1, 16, 16)
    with torch.no_grad():
        fake = model(x).numpy()
    meta = metadata_for("student", "mobilenet:16", CLASSES, [0.5], [0.25], [1, 16, 16], 18)
    fp32 = save_onnx(to_onnx(qat.strip(model), [1, 16, 16], 18, meta), tmp_path / "qat.onnx")
    int8 = Quantizer(fp32, [calibration.numpy()], "minmax", tmp_path / "work").write(Int8Config(), tmp_path / "i.onnx")
    got, plain = ort_predict(int8, [x.numpy()]), ort_predict(fp32, [x.numpy()])
    agree = (got.argmax(1) == fake.argmax(1)).mean()
    assert agree >= 0.95, agree
    # the fake-quantized model is nearer the int8 file than the fp32 one is
    assert np.abs(got - fake).mean() < np.abs(got - plain).mean()


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """The quantize stage with quantize.qat_epochs: 1 on tiny data: a tinycnn teacher and a mobilenet:16
    student trained for a few steps, distilled with KD."""
    tmp = tmp_path_factory.mktemp("qat")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["quantize"] |= {"search_runs": 10, "search_rounds": 2, "samples": 32, "qat_epochs": 1}
    params["distill"] |= {"batch_size": 16, "eval_batch_size": 32}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    data = Prepared(**{name: make_split(n, len(CLASSES), 1, 16, seed) for name, n, seed in
                       (("train", 64, 0), ("val", 48, 1), ("test", 40, 2))}, classes=CLASSES, mean=[0.5], std=[0.25])
    save_prepared(data, tmp / "data")
    torch.manual_seed(0)
    for role, arch in (("teacher", "tinycnn"), ("student", "mobilenet:16")):
        model = create_model(arch, len(CLASSES), 1)
        save_checkpoint(tmp / f"{role}.pt", arch, len(CLASSES), 1, model.state_dict())
        meta = metadata_for(role, arch, CLASSES, [0.5], [0.25], [1, 16, 16], 18)
        save_onnx(to_onnx(model.eval(), [1, 16, 16], 18, meta), tmp / "onnx" / f"{role}.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        assert quantize_stage.main(["--params", str(tmp / "params.yaml"), "--data", str(tmp / "data"), "--onnx",
                                    str(tmp / "onnx"), "--student", str(tmp / "student.pt"), "--teacher",
                                    str(tmp / "teacher.pt"), "--metrics", str(tmp / "quantize.json")]) == 0
    return tmp, json.loads((tmp / "quantize.json").read_text())


def test_quantize_stage_searches_the_fine_tuned_student_too(qat_run):
    tmp, report = qat_run
    student = report["student"]
    names = [s["config"]["name"] for s in student["search"]]
    plain = [n for n in names if not n.startswith("qat-")]
    assert plain[0] == "all" and names == plain + [f"qat-{n}" for n in plain]  # PTQ first: simpler at a tie
    timed = {s["config"]["name"]: s["timed_as"] for s in student["search"]}
    assert all(timed[f"qat-{n}"] == timed[n] for n in plain)  # the same kernels share one timing
    assert student["source"] == ("qat" if student["config"]["name"].startswith("qat-") else "ptq")
    fine = student["qat"]
    assert fine["epochs"] == 1 and fine["best_epoch"] == 0 and 0 <= fine["fake_quant_val_top1"] <= 1
    assert fine["parity"]["int8_file"] == "qat-all" and fine["parity"]["top1_agreement"] >= 0.9
    assert set(student["compared"]) == {"all", "qat-all"}
    vals = {s["config"]["name"]: s["val_int8_top1"] for s in student["search"]}
    assert all(student["compared"][n]["val_int8_top1"] == vals[n] for n in ("all", "qat-all"))
    assert "qat" not in report["teacher"] and "qat-all" not in json.dumps(report["teacher"])
    int8 = tmp / "onnx" / "student.int8.onnx"
    assert json.loads(read_metadata(int8)["kdcompress.int8_config"]) == student["config"]


def test_the_card_says_where_the_int8_file_comes_from(qat_run):
    from kdcompress.report.card import _qat

    _, report = qat_run
    student = report["student"]
    text = "\n".join(_qat(student))
    c = student["compared"]
    assert f"post-training int8 val top-1 {c['all']['val_int8_top1']:.2%}" in text
    assert f"quantization-aware {c['qat-all']['val_int8_top1']:.2%}" in text
    assert ("comes from quantization-aware" if student["source"] == "qat" else "comes from post-training") in text
    assert _qat({k: v for k, v in student.items() if k != "qat"}) == []
