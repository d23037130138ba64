"""The quantize stage's measured int8 search: the candidate list, the depthwise and squeeze-excitation
exclusions, the choice rule (on synthetic timings and accuracies: nothing is timed there), and the stage
on tiny data writing the search list and a chosen file that onnxruntime and the predictor run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from conftest import ROOT, make_split
from torch import nn
from torchvision.ops import SqueezeExcitation

from kdcompress.common import tracking
from kdcompress.common.int8 import Int8Config, Quantizer, int8_path
from kdcompress.common.onnx import METADATA_KEYS, ort_predict, read_metadata, save_onnx, session, to_onnx
from kdcompress.config import QuantizeConfig
from kdcompress.data.loader import make_loader
from kdcompress.data.prepared import Prepared, save_prepared
from kdcompress.deploy import int8_search, predict
from kdcompress.deploy.export import metadata_for
from kdcompress.deploy.int8_search import (
    Search,
    candidates,
    choose,
    depthwise_convs,
    kept_fp32,
    onnxruntime_graph,
    quantized_nodes,
    se_blocks,
    with_activations,
    write_candidates,
)
from kdcompress.deploy.quantize import accuracy
from kdcompress.deploy.ship import decide
from models import create_model
from models.base import Classifier
from pipeline import quantize as quantize_stage
from pipeline import ship

CLASSES, SHAPE = ["a", "b", "c", "d"], [1, 16, 16]


def export(model: nn.Module, path: Path, shape: list[int] = SHAPE) -> Path:
    meta = metadata_for("student", getattr(model, "arch", "test"), CLASSES, [0.5] * shape[0], [0.25] * shape[0],
                        shape, 18)
    return save_onnx(to_onnx(model.eval(), shape, 18, meta), path)


def images(n: int, seed: int, shape: list[int] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32)


class SENet(Classifier):
    """conv -> hard-swish -> squeeze-excitation -> depthwise conv -> ReLU -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish())
        self.stages = nn.ModuleDict({"stage1": nn.Sequential(SqueezeExcitation(8, 4), nn.Conv2d(8, 8, 3, padding=1,
                                                                                                groups=8), nn.ReLU())})
        self.head = nn.Linear(8, len(CLASSES))


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """The default student's architecture at 16 px, pre-processed and calibrated once."""
    folder = tmp_path_factory.mktemp("mobilenet")
    torch.manual_seed(0)
    model = create_model("mobilenet:16", len(CLASSES), 1)
    fp32 = export(model, folder / "student.onnx")
    return model, fp32, Quantizer(fp32, [images(16, 1)], "minmax", folder / "work")


@pytest.fixture(scope="module")
def senet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("senet")
    torch.manual_seed(0)
    fp32 = export(SENet(), folder / "se.onnx", [3, 16, 16])
    return fp32, Quantizer(fp32, [images(8, 1, [3, 16, 16])], "minmax", folder / "work")


def test_candidates_are_deterministic_and_skip_what_changes_nothing(mobilenet):
    _, _, quantizer = mobilenet
    first, again = candidates(quantizer.graph, True), candidates(quantizer.graph, True)
    assert first == again
    # no Add, Mul, pooling or squeeze-excitation in this net: those scopes would quantize the same nodes
    scopes = ["all", "conv_gemm", "all_dw_fp32", "conv_gemm_dw_fp32"]
    assert [c.name for c in first] == scopes + [f"{s}-per_tensor" for s in scopes] + \
        [f"{s}-reduce_range" for s in scopes]
    assert first[0] == Int8Config(per_channel=True)  # the project's single configuration comes first
    assert [(c.per_channel, c.reduce_range) for c in first] == [(True, False)] * 4 + [(False, False)] * 4 + \
        [(True, True)] * 4
    assert len({(quantized_nodes(quantizer.graph, c), c.per_channel, c.reduce_range) for c in first}) == len(first)
    flipped = candidates(quantizer.graph, False)
    assert [c.name for c in flipped[4:8]] == [f"{s}-per_channel" for s in scopes] and not flipped[0].per_channel


def test_depthwise_exclusion_picks_exactly_the_depthwise_convs(mobilenet):
    model, _, quantizer = mobilenet
    graph = quantizer.graph
    torch_dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    all_convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    dw = depthwise_convs(graph)
    assert len(dw) == len(torch_dw) == 6 and len(all_convs) == 13  # the 1-channel stem (group 1) is no depthwise
    groups = {n.name: next(a.i for a in n.attribute if a.name == "group") for n in all_convs if n.name in dw}
    weights = {t.name: list(t.dims) for t in graph.graph.initializer}
    assert all(groups[n.name] == weights[n.input[1]][0] > 1 for n in all_convs if n.name in dw)
    with_relu = with_activations(graph, dw)
    extra = [n for n in graph.graph.node if n.name in set(with_relu) - set(dw)]
    dw_outputs = {n.output[0] for n in all_convs if n.name in dw}
    assert len(extra) == 6 and all(n.op_type == "Relu" and n.input[0] in dw_outputs for n in extra)


def test_squeeze_excitation_and_hardswish_are_found(senet):
    senet = senet[1].graph
    ops = {n.name: n for n in senet.graph.node}
    assert all(ops) and len(ops) == len(senet.graph.node)  # unnamed exporter nodes (hard-swish) were named
    se = se_blocks(senet)
    assert sorted(ops[n].op_type for n in se) == ["Conv", "Conv", "ReduceMean", "Relu", "Sigmoid"]
    assert not any(ops[n].op_type == "Mul" for n in se)  # the Mul scales the full map and stays with it
    stem = next(n for n in senet.graph.node if n.op_type == "Conv")
    assert sorted(ops[n].op_type for n in with_activations(senet, [stem.name])) == ["Conv", "HardSigmoid", "Mul"]
    names = [c.name for c in candidates(senet, True)]
    assert {"all_se_fp32", "all_dw_fp32", "conv_gemm_eltwise"} <= set(names)


def test_exclusions_onnxruntime_undoes_are_dropped(mobilenet, senet, tmp_path):
    """A ReLU depthwise conv between int8 neighbours is quantized again when onnxruntime loads the file
    (DequantizeLinear -> Conv -> ReLU -> QuantizeLinear); a squeeze-excitation block's convs stay fp32."""
    _, _, quantizer = mobilenet
    configs = candidates(quantizer.graph, True)
    files, timed_as, dropped = write_candidates(quantizer, configs, tmp_path / "mobilenet")
    assert dropped == [c.name for c in configs if "dw_fp32" in c.name] and len(dropped) == 6
    assert list(files) == list(timed_as) == [c.name for c in configs if c.name not in dropped]
    assert set(timed_as.values()) == {"all"}  # nothing else to quantize here: the same QLinearConvs in all six
    assert sorted(p.name for p in (tmp_path / "mobilenet").iterdir()) == sorted(f"{n}.onnx" for n in files)
    fp32, se_quantizer = senet
    se = next(c for c in candidates(se_quantizer.graph, True) if c.name == "all_se_fp32")
    kept = {name: kept_fp32(onnxruntime_graph(path), se.exclude) for name, path in (
        ("se", se_quantizer.write(se, tmp_path / "se.onnx")),
        ("all", se_quantizer.write(Int8Config(), tmp_path / "all.onnx")), ("fp32", fp32))}
    assert kept == {"se": 2, "all": 0, "fp32": 2}  # the block's two 1x1 convs


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_calibration_takes_one_batch_at_a_time(mobilenet, tmp_path, monkeypatch, method):
    """The calibrator collects each batch's tensors apart and merges them (memory of one batch, not of all
    calibration images); min-max ranges, and so the int8 file, are those of all images in one batch."""
    from onnxruntime.quantization import calibrate

    seen = []
    for cls in (calibrate.MinMaxCalibrater, calibrate.HistogramCalibrater):
        def collect(self, reader, _orig=cls.collect_data):
            before = len(seen)
            _orig(self, _Counting(reader, seen))
            assert len(seen) - before <= 1, "the calibrator was handed more than one batch at once"
        monkeypatch.setattr(cls, "collect_data", collect)
    _, fp32, _ = mobilenet
    batches = [images(4, seed) for seed in range(3)]
    files = [Quantizer(fp32, b, method, tmp_path / f"w{i}").write(Int8Config(), tmp_path / f"{i}.onnx")
             for i, b in enumerate((batches, [np.concatenate(batches)]))]
    assert len(seen) == 4  # three batches one by one, then the single batch
    if method == "minmax":
        assert files[0].read_bytes() == files[1].read_bytes()


class _Counting:
    """A calibration reader that records each batch it hands out."""

    def __init__(self, reader, seen: list):
        self.reader, self.seen = reader, seen

    def get_next(self):
        batch = self.reader.get_next()
        if batch is not None:
            self.seen.append(batch)
        return batch


@pytest.mark.parametrize("results, expected", [
    ([(1.0, True), (0.5, True), (0.3, False)], 1),  # the fastest passing one, not the fastest
    ([(1.0, True), (0.52, True), (0.50, True)], 1),  # within 5 % of the fastest: the simpler wins
    ([(1.0, True), (0.53, True), (0.50, True)], 2),  # 6 % slower: the fastest wins
    ([(0.2, False), (0.1, False)], None),  # none passes: no int8 candidate
])
def test_choice_rule(results, expected):
    entries = [{"p50_ms": ms, "passed": ok, "index": i} for i, (ms, ok) in enumerate(results)]
    chosen = choose(entries)
    assert (chosen and chosen["index"]) == expected
    assert choose(entries, within=0.0) == (None if expected is None else min(
        (e for e in entries if e["passed"]), key=lambda e: e["p50_ms"]))


def fake_logits(labels: np.ndarray, wrong: int) -> np.ndarray:
    """Logits right on every image but the first ``wrong``."""
    return np.eye(len(CLASSES), dtype=np.float32)[(labels + (np.arange(len(labels)) < wrong)) % len(CLASSES)]


DW3 = ("conv_gemm_dw_fp32", "conv_gemm_dw_fp32-per_tensor", "conv_gemm_dw_fp32-reduce_range")


@pytest.mark.parametrize("timings, wrong, chosen", [
    ({"all_se_fp32": 0.5, "conv_gemm_dw_fp32": 0.3}, {n: 1 for n in DW3}, "all_se_fp32"),  # faster ones fail
    ({"conv_gemm": 0.3}, {"conv_gemm": 1}, "conv_gemm-per_tensor"),  # a weight variant: its scope's kernels
    ({"conv_gemm": 0.52, "all_se_fp32": 0.50}, {}, "conv_gemm"),  # within 5 %: the simpler
    ({"conv_gemm": 0.53, "all_se_fp32": 0.50}, {}, "all_se_fp32"),  # 6 % slower: the fastest
    ({}, None, None),  # none passes: the simplest is written, fp32 ships
])
def test_search_writes_the_chosen_candidate(senet, tmp_path, monkeypatch, timings, wrong, chosen):
    """Synthetic accuracies (1 wrong image in 100 = 1 point, over the 0.5-point gate) and timings (by the
    candidate whose kernels are timed), nothing timed: SENet's 18 candidates run 5 sets of kernels."""
    fp32 = tmp_path / "student.onnx"
    fp32.write_bytes(senet[0].read_bytes())
    search = Search(fp32, lambda: [images(8, 1, [3, 16, 16])], QuantizeConfig(), tmp_path / "work", search=True)
    names, timed = list(search.configs), []
    assert sorted(set(search.timed_as.values())) == ["all", "all_dw_fp32", "all_se_fp32", "conv_gemm",
                                                     "conv_gemm_dw_fp32"] and len(names) == 18
    monkeypatch.setattr(int8_search, "block_runs", lambda path, shape, runs, rounds: 1)
    monkeypatch.setattr(int8_search, "time_models", lambda paths, *a: timed.extend(paths) or {
        name: timings.get(name, 1.0) if name != "fp32" else 0.4 for name in paths})
    labels, wrong = np.arange(100) % len(CLASSES), {n: 2 for n in names} if wrong is None else wrong
    val = {"fp32": fake_logits(labels, 0), **{n: fake_logits(labels, wrong.get(n, 0)) for n in names}}
    written = search.decide(val, labels)
    assert sorted(timed) == sorted(["fp32", *set(search.timed_as.values())])  # each set of kernels once
    expected = chosen or names[0]
    assert written == int8_path(fp32) and written.read_bytes() == search.models[expected].read_bytes()
    report = search.report({"fp32": val["fp32"], expected: val[expected]}, labels, 8)
    assert report["chosen"] == chosen and report["config"]["name"] == expected
    assert report["passed"] == (chosen is not None) and report["fp32_p50_ms"] == 0.4
    assert [s["config"]["name"] for s in report["search"]] == names
    assert [s["passed"] for s in report["search"]] == [wrong.get(n, 0) == 0 for n in names]
    assert all(s["p50_ms"] == timings.get(search.timed_as[s["config"]["name"]], 1.0) for s in report["search"])
    assert decide(report, 0.4, 0.1)[0] == ("fp32" if chosen is None else "int8")


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """The quantize stage on tiny data (random-weight tinycnn teacher and mobilenet:16 student, 16 px),
    timing with the fewest runs params allow: its folder, data and report."""
    tmp = tmp_path_factory.mktemp("stage")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["quantize"] |= {"search_runs": 10, "search_rounds": 2, "samples": 32}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    torch.manual_seed(0)
    export(create_model("tinycnn", len(CLASSES), 1), tmp / "onnx" / "teacher.onnx")
    export(create_model("mobilenet:16", len(CLASSES), 1), tmp / "onnx" / "student.onnx")
    (tmp / "student.pt").write_bytes(b"checkpoint")
    data = Prepared(**{name: make_split(n, len(CLASSES), 1, 16, seed) for name, n, seed in
                       (("train", 64, 0), ("val", 48, 1), ("test", 40, 2))}, classes=CLASSES, mean=[0.5], std=[0.25])
    save_prepared(data, tmp / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        assert quantize_stage.main(["--params", str(tmp / "params.yaml"), "--data", str(tmp / "data"), "--onnx",
                                    str(tmp / "onnx"), "--student", str(tmp / "student.pt"), "--metrics",
                                    str(tmp / "quantize.json")]) == 0
        run = tracking.runs("student")[0]
    return tmp, data, json.loads((tmp / "quantize.json").read_text()), run


def test_quantize_stage_writes_the_search_and_a_chosen_file(stage_run):
    tmp, data, report, run = stage_run
    student, teacher = report["student"], report["teacher"]
    names = [s["config"]["name"] for s in student["search"]]
    assert names[0] == "all" and len(names) == len(set(names)) == 6
    assert len(student["search_dropped"]) == 6 and all("dw_fp32" in n for n in student["search_dropped"])
    assert all({"config", "p50_ms", "val_int8_top1", "drop_points", "passed"} <= set(s) for s in student["search"])
    assert student["passed"] == (student["chosen"] is not None) and student["config"]["name"] in names
    assert student["search_profile"]["threads"] == 1 and student["val"]["samples"] == 48
    assert student["test"]["samples"] == 40 and "test" not in json.dumps(student["search"])
    assert "search" not in teacher and teacher["config"]["name"] == "all"  # the teacher keeps one configuration
    naive = next(s for s in student["search"] if s["config"]["name"] == "all")  # reported beside the written one
    assert set(student["compared"]) == {"all"} and student["compared"]["all"]["val_int8_top1"] == naive["val_int8_top1"]
    assert "qat" not in student and student["source"] == "ptq"
    fp32, int8 = tmp / "onnx" / "student.onnx", int8_path(tmp / "onnx" / "student.onnx")
    meta = read_metadata(int8, METADATA_KEYS)
    assert read_metadata(fp32).items() <= meta.items() and meta["kdcompress.precision"] == "int8"
    assert json.loads(meta["kdcompress.int8_config"]) == student["config"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(int8)).graph.node}
    val = [x.numpy() for x, _, _ in make_loader(data, "val", "cpu", 16).batches()]
    logits = ort_predict(int8, val)
    assert accuracy(ort_predict(fp32, val), logits, data.val.labels.numpy()) == student["val"]  # the file measured
    session(int8)  # onnxruntime loads it, and so does the torch-free predictor
    assert (predict.load(int8).probabilities(np.concatenate(val)).argmax(1) == logits.argmax(1)).all()
    assert all(f"quantize.student.search.{n}.p50_ms" in run["metrics"] for n in names)
    assert run["tags"]["quantize.student.chosen"] == str(student["chosen"])


def test_ship_stage_cards_the_search(stage_run, tmp_path, monkeypatch):
    """The ship stage on the quantize stage's output, the other stages' figures made up (int8 twice as fast)."""
    tmp, _, report, _ = stage_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    figures = {"ort_edge": {"p50_ms": 0.2, "p90_ms": 0.2, "p99_ms": 0.2}, "ort_server": {"images_per_s": 1000.0},
               "memory_edge": {"peak_rss_mib": 5.0}, "file_bytes": 2048}
    bench = {role: {"fp32": figures, "int8": {**figures, "ort_edge": {"p50_ms": 0.1, "p90_ms": 0.1, "p99_ms": 0.1}}}
             for role in ("student", "teacher")} | {
        "environment": {"onnxruntime": "1", "cpu": "Some ARM core", "cpu_count": 2, "server_batch": 64}}
    inputs = {"evaluation": {"student": {"top1": 0.9, "ece": 0.01, "agreement": 0.95}, "teacher": {"top1": 0.93}},
              "export": {"student": {"params": 1234, "macs": 5e6, "samples": 64, "max_abs_diff": 1e-6,
                                     "top1_agreement": 1.0}}, "benchmark": bench}
    args = ["--onnx", str(tmp / "onnx"), "--student", str(tmp / "student.pt"), "--quantization",
            str(tmp / "quantize.json"), "--out", str(tmp_path / "ship"), "--metrics", str(tmp_path / "summary.json")]
    for name, value in inputs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
        args += [f"--{name}", str(tmp_path / f"{name}.json")]
    assert ship.main(args) == 0
    student, shipped = report["student"], tmp_path / "ship"
    int8_ships = student["chosen"] is not None
    assert (shipped / "model.fp32.onnx").exists() == int8_ships
    assert (shipped / "model.onnx").read_bytes() == (tmp / "onnx" / ("student.int8.onnx" if int8_ships else
                                                                      "student.onnx")).read_bytes()
    text = (shipped / "MODEL_CARD.md").read_text()
    assert "Latencies measured on Some ARM core (the int8 configuration search on" in text and "ARM" in text
    table = text[text.index("## int8 configurations searched"):text.index("## Student metrics")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0].strip("| *") for r in rows] == [s["config"]["name"] for s in student["search"]]
    assert sum("**" in r for r in rows) == int8_ships
    assert "Left out: " + ", ".join(f"`{n}`" for n in student["search_dropped"]) + ": onnxruntime" in table
    assert (f"The int8 candidate: **{student['chosen']}**" if int8_ships else "No configuration passed") in table


def test_search_off_is_the_single_configuration(mobilenet, tmp_path):
    _, fp32, _ = mobilenet
    (tmp_path / "student.onnx").write_bytes(fp32.read_bytes())
    search = Search(tmp_path / "student.onnx", lambda: [images(16, 1)], replace(QuantizeConfig(), search=False),
                    tmp_path / "work", search=False)
    assert list(search.models) == ["fp32", "all"] and search.configs["all"] == Int8Config(per_channel=True)
