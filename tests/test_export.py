"""ONNX export of every architecture and the parity gate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from kdcompress.common import onnx as konnx
from kdcompress.common.onnx import (
    ParityError,
    parity,
    read_metadata,
    save_onnx,
    to_onnx,
)
from kdcompress.deploy import profiling
from kdcompress.deploy.export import metadata_for
from kdcompress.deploy.profiling import count_macs, count_params
from models import MODELS, create_model


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(m for m in MODELS if m not in ("tv", "timm")) + ["tv:mobilenet_v3_small",
                                                                                      "timm:mobilenetv3_small_050"])
def test_export_parity_every_model(tmp_path, arch):
    model = create_model(arch, 10, 3).eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding them is actually tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
                m.weight.uniform_(0.2, 0.6)
    meta = metadata_for("student", arch, list("abcdefghij"), [0.5] * 3, [0.25] * 3, [3, 20, 20], 18)
    path = save_onnx(to_onnx(model, [3, 20, 20], 18, meta), tmp_path / "m.onnx")
    inputs = [torch.randn(7, 3, 20, 20), torch.randn(1, 3, 20, 20)]  # two batch sizes: dynamic axis
    with torch.no_grad():
        ref = torch.cat([model(x) for x in inputs])
    result = parity(path, ref, inputs, atol=1e-4)
    assert result["samples"] == 8 and result["top1_agreement"] == 1.0
    assert read_metadata(path)["kdcompress.architecture"] == arch
    onnx.checker.check_model(str(path), full_check=True)


def test_parity_gate_fails_on_a_different_model(tmp_path):
    model = create_model("tinycnn", 10, 1).eval()
    path = save_onnx(to_onnx(model, [1, 12, 12], 18, {}), tmp_path / "m.onnx")
    x = [torch.randn(16, 1, 12, 12)]
    with torch.no_grad():
        ref = model(x[0])
    with pytest.raises(ParityError, match=r"max \|dlogit\|"):
        parity(path, ref + 1e-3, x, atol=1e-4)


def test_parity_gates_the_logits_and_reports_a_near_tie_that_flips(tmp_path):
    """Within atol the top-1 class changes only at near-ties: such a flip is reported, not refused; the
    same flip with a logit moved beyond atol fails."""
    model = create_model("tinycnn", 10, 1).eval()
    with torch.no_grad():  # every image's logits are the bias: class 0 leads class 1 by 5e-5
        model.head.weight.zero_()
        model.head.bias.copy_(torch.linspace(0.0, -1.0, 10))
        model.head.bias[1] = -5e-5
    path = save_onnx(to_onnx(model, [1, 12, 12], 18, {}), tmp_path / "m.onnx")
    x = [torch.randn(16, 1, 12, 12)]
    with torch.no_grad():
        ref = model(x[0])
    ref[:, 1] += 8e-5  # as if PyTorch rounded class 1 up: it leads now, by 3e-5
    result = parity(path, ref, x, atol=1e-4)
    assert result["top1_agreement"] == 0.0 and result["max_abs_diff"] <= 1e-4
    ref[:, 1] += 1e-3
    with pytest.raises(ParityError, match=r"allowed <= 0.0001, export.atol\), top-1 agreement 0.0000%"):
        parity(path, ref, x, atol=1e-4)


def test_params_and_macs_hand_counted():
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, bias=False))
    assert count_params(conv) == 18
    assert count_macs(conv, [1, 5, 5]) == 2 * 9 * 25  # out channels * kernel * output positions


def test_latency_blocks_interleave_the_models(tmp_path, monkeypatch):
    """Each round times every model once, each in a fresh session: a busy spell of the host falls on all
    the models a decision compares (the benchmark stage's four, the search's candidates)."""
    paths = {name: save_onnx(to_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), [1, 2, 2], 18,
                                     {}), tmp_path / f"{name}.onnx") for name in ("a", "b")}
    opened, real = [], profiling.session
    monkeypatch.setattr(profiling, "session", lambda path, threads: opened.append(path.stem) or real(path, threads))
    runs = profiling.interleaved_runs(paths, [1, 2, 2], {"a": 3, "b": 5}, rounds=4, warmup=1)
    assert opened == ["a", "b"] * 4
    assert {k: len(v) for k, v in runs.items()} == {"a": 12, "b": 20} and min(runs["a"] + runs["b"]) > 0


def test_models_predicted_side_by_side_keep_no_memory_arena(tmp_path, monkeypatch):
    """The quantize stage predicts all its int8 candidates in one pass: each session returns a run's memory
    when the run ends (an arena per session held 2.3 GB each for an EfficientNet-B0 at 64 px), and every
    model's logits are those it gives alone."""
    torch.manual_seed(0)
    paths = {name: save_onnx(to_onnx(create_model("tinycnn", 3, 1), [1, 8, 8], 18, {}), tmp_path / f"{name}.onnx")
             for name in ("a", "b")}
    arenas, real = [], konnx.ort.InferenceSession
    monkeypatch.setattr(konnx.ort, "InferenceSession",
                        lambda path, opts, **kw: arenas.append(opts.enable_cpu_mem_arena) or real(path, opts, **kw))
    batches = [np.random.default_rng(i).standard_normal((4, 1, 8, 8), dtype=np.float32) for i in range(2)]
    together = konnx.ort_predict_many(paths, batches)
    assert arenas == [False, False]
    for name, path in paths.items():
        np.testing.assert_array_equal(together[name], konnx.ort_predict(path, batches))
    assert not np.allclose(together["a"], together["b"])


@pytest.mark.parametrize("arch", ["resnet20", "mobilenet"])
def test_ort_teacher_extract_matches_pytorch(arch):
    """The onnxruntime teacher gives the same logits, embedding and named stage outputs as the
    PyTorch model, for a channels_last input and a batch size it was not exported with."""
    from kdcompress.training.ort_teacher import OrtTeacher

    model = create_model(arch, 10, 1).eval()
    x = torch.randn(5, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model.extract(x)
    got = OrtTeacher(model, [1, 28, 28], threads=1).extract(x)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.embedding, want.embedding, atol=1e-4, rtol=1e-4)
    assert list(got.features) == list(want.features)
    for name in want.features:
        torch.testing.assert_close(got.features[name], want.features[name], atol=1e-4, rtol=1e-4)


def test_int8_twin_of_the_ort_teacher_is_quantized_and_close():
    """The int8 teacher for SAKD's difficulty pass: QDQ nodes in its graph, the fp32 teacher left as
    it was, and outputs close to fp32 (it only has to rank samples)."""
    from kdcompress.training.ort_teacher import OrtTeacher

    torch.manual_seed(0)
    model = create_model("tinycnn", 10, 1).eval()
    teacher = OrtTeacher(model, [1, 16, 16], threads=1)
    x = torch.randn(64, 1, 16, 16)
    int8 = teacher.int8([x[:32].numpy(), x[32:].numpy()])
    fp32_out, int8_out = teacher.extract(x), int8.extract(x)
    assert int8.session is not teacher.session and int8.stages == teacher.stages
    assert not torch.equal(int8_out.logits, fp32_out.logits)  # really another model
    assert torch.equal(teacher.extract(x).logits, fp32_out.logits)  # and the fp32 one untouched
    corr = torch.corrcoef(torch.stack([int8_out.logits.flatten(), fp32_out.logits.flatten()]))[0, 1]
    assert corr > 0.98 and int8_out.embedding.shape == fp32_out.embedding.shape


@pytest.mark.parametrize("method", ["kd", "at", "crd"])
def test_distillation_step_same_with_ort_teacher(method):
    """A logit, a feature and an embedding method: same loss and same student gradients whether the
    teacher runs on PyTorch or onnxruntime."""
    from kdcompress.methods import build_loss
    from kdcompress.training.distiller import Distiller
    from kdcompress.training.ort_teacher import OrtTeacher

    teacher = create_model("resnet20", 10, 1).eval()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    results = []
    for runtime in (teacher, OrtTeacher(teacher, [1, 28, 28], threads=1)):
        torch.manual_seed(0)
        student = create_model("tinycnn", 10, 1)
        distiller = Distiller(student, runtime, build_loss(method, None))
        distiller.setup(x)
        out = distiller(x, y)
        out.loss.backward()
        results.append((out.loss.detach(), student.head.weight.grad.clone()))
    (loss_pt, grad_pt), (loss_ort, grad_ort) = results
    assert loss_pt > 0
    torch.testing.assert_close(loss_ort, loss_pt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_ort, grad_pt, atol=1e-4, rtol=1e-4)


def test_teacher_runtime_auto():
    """auto: onnxruntime on the CPU, PyTorch on CUDA and for a method that needs the teacher's grads."""
    from kdcompress.methods import build_loss
    from kdcompress.training.ort_teacher import use_ort_teacher

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    kd, data_free = build_loss("kd", None), build_loss("data_free", None)
    assert use_ort_teacher("auto", kd, cpu) and use_ort_teacher("onnxruntime", kd, cpu)
    assert not use_ort_teacher("auto", kd, cuda) and not use_ort_teacher("torch", kd, cpu)
    assert not use_ort_teacher("auto", data_free, cpu)
