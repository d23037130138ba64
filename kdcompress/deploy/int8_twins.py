"""The quantize stage as one function: static int8 (QDQ) twins of the exported student and teacher,
calibrated on a seeded sample of training images. The student's is the fastest of a bounded list of
configurations (batch 1, one thread) that passes the accuracy gate on val (quantize.search,
kdcompress.deploy.int8_search; the teacher keeps SAKD's single configuration); test top-1 is only reported.
With a ``fine_tune`` (quantize.qat_epochs: the stage passes kdcompress.training.qat's) the student is also
fine-tuned with fake quantization under its distillation loss and that model's int8 files join the search,
checked against the fake-quantized student. A model that fails the gate is written for inspection; the ship
stage never ships it."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from kdcompress.common.onnx import ort_predict_many
from kdcompress.deploy.int8_search import Search
from kdcompress.deploy.quantize import accuracy

SPLITS = ("val", "test")  # the gate's (decision), then the reported one
COMPARED = ("all", "qat-all")  # naive int8 (every op type), then its QAT twin: val and test top-1 reported


def quantize_twins(cfg, onnx_dir: str | Path, labels: dict[str, np.ndarray],
                   batches: Callable[[str], Iterable[np.ndarray]], calibration: Callable[[], Iterable[np.ndarray]],
                   calibration_samples: int, fine_tune: Callable[[Path], tuple[Path, dict, np.ndarray]] | None = None
                   ) -> dict:
    """The quantize.json report of both roles (``cfg``: the quantize section; the caller checks the files'
    metadata); writes ``<role>.int8.onnx``
    beside ``onnx_dir/<role>.onnx``. ``batches(split)``: the split's normalised images in order (``labels``:
    theirs, val and test); ``calibration()``: the calibration batches (``calibration_samples`` images);
    ``fine_tune(folder)``: the fine-tuned
    student as fp32 ONNX in ``folder``, its summary and its fake-quantized val logits."""
    onnx_files = {role: Path(onnx_dir) / f"{role}.onnx" for role in ("student", "teacher")}
    with tempfile.TemporaryDirectory(prefix="kdcompress-int8-") as tmp:
        fine_tuned, fine_summary, fine_logits = fine_tune(Path(tmp)) if fine_tune else (None, None, None)
        searches = {role: Search(fp32, calibration, cfg, Path(tmp) / role, search=cfg.search and role == "student",
                                 qat=fine_tuned if role == "student" else None) for role, fp32 in onnx_files.items()}
        val = ort_predict_many({(r, name): p for r, s in searches.items() for name, p in s.models.items()},
                               batches("val"))
        for r, s in searches.items():
            s.decide({name: val[r, name] for name in s.models}, labels["val"])
        compared = COMPARED if fine_tune else COMPARED[:1]
        test = ort_predict_many({(r, name): s.models[name] for r, s in searches.items()
                                 for name in {"fp32", s.written, *(compared if r == "student" else ())}},
                                batches("test"))
    report = {r: s.report({name: test[r, name] for name in ("fp32", s.written)}, labels["test"], calibration_samples)
              for r, s in searches.items()}
    figures = {split: (v, labels[split]) for split, v in (("val", val), ("test", test))}
    report["student"]["compared"] = {name: {  # naive int8 (and its QAT twin) beside the written file
        f"{split}_int8_top1": accuracy(v["student", "fp32"], v["student", name], y)["int8_top1"]
        for split, (v, y) in figures.items()} for name in compared}
    if fine_summary is not None:  # the fine-tuned student's int8 file against its fake-quantized self
        got = val["student", "qat-all"]
        report["student"]["qat"] = {**fine_summary, "parity": {
            "int8_file": "qat-all", "top1_agreement": float((fine_logits.argmax(1) == got.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(fine_logits - got).max())}}
    return report
