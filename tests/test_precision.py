"""teacher.precision / distill.precision: ``auto`` is a fixed rule of the host and the network (bf16 on a GPU
with bf16, on a CPU only with native bf16 and no depthwise convolutions), what a stage used is printed,
logged and keyed, and the old ``base.precision`` points to the new keys."""

from __future__ import annotations

import mlflow
import pytest
import torch
import yaml
from conftest import ROOT, write_params

from kdcompress import runtime
from kdcompress.config import load_params
from kdcompress.training.resume import resume_point
from kdcompress.types import UserError
from models import create_model
from pipeline import prepare, train_teacher

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("bf16_cpu, device, gpu_bf16, model, expected", [
    (False, CPU, None, "resnet20", "fp32"),        # AVX2: bf16 would be emulated
    (False, CPU, None, "mobilenet:16", "fp32"),
    (True, CPU, None, "resnet20", "bf16"),         # AVX-512 BF16 / AMX: native
    (True, CPU, None, "mobilenet:16", "fp32"),     # depthwise convs are slower in bf16 there
    (True, CPU, None, "tv:mobilenet_v3_small", "fp32"),
    (True, CPU, None, "tinycnn", "bf16"),
    (False, CUDA, True, "mobilenet:16", "bf16"),
    (False, CUDA, False, "resnet20", "fp16"),
])
def test_auto_is_a_fixed_rule_of_host_and_network(monkeypatch, bf16_cpu, device, gpu_bf16, model, expected):
    monkeypatch.setattr(runtime, "native_bf16", lambda: bf16_cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    net = create_model(model, 10, 1)
    precision, why = runtime.resolve_precision("auto", net, device)
    assert precision == expected and why.startswith("auto: ")
    for chosen in ("fp32", "bf16", "fp16"):  # a value other than auto is used as set, on any host
        assert runtime.resolve_precision(chosen, net, device) == (chosen, "as set")


def test_depthwise_means_one_filter_per_input_channel():
    grouped = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, groups=2))
    depthwise = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, groups=8))
    assert not runtime.has_depthwise(grouped) and runtime.has_depthwise(depthwise)
    assert not runtime.has_depthwise(torch.nn.Conv2d(1, 8, 3))  # one input channel: a plain conv


def test_base_precision_is_refused_with_where_it_moved(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"]["precision"] = "bf16"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match=r"^base.precision: moved to teacher.precision and distill.precision"):
        load_params(tmp_path / "params.yaml")


def test_the_resolved_precision_keys_the_resume_point(tmp_path):
    params = load_params(ROOT / "params.yaml")
    keys = {p: resume_point(tmp_path / "r.pt", "distill", params, ("distill",), [], precision=p)[0].key
            for p in ("fp32", "bf16")}
    assert keys["fp32"] != keys["bf16"]


def test_the_teacher_stage_trains_logs_and_prints_what_auto_picked(project, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)  # as on an AVX-512 BF16 host
    write_params(project, teacher={"precision": "auto", "model": "resnet20", "epochs": 1, "batch_size": 32,
                                   "lr": 0.05, "eval_batch_size": 64})
    assert prepare.main([]) == 0 and train_teacher.main([]) == 0
    out = capsys.readouterr().out
    assert "teacher: training in bf16 (auto: a CPU with native bf16, no depthwise convolutions)" in out
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.params["teacher.precision"] == "auto" and run.data.params["teacher.precision_used"] == "bf16"
