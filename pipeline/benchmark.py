"""Stage 7: onnxruntime CPU figures of the student and the teacher, fp32 and int8: edge profile
(batch 1, one thread, sequential; p50/p90/p99), server profile (batch 64, all cores; throughput),
peak memory of loading and running each model, file size; the fp32 student on PyTorch eager for the ratio."""

from __future__ import annotations

import functools

import torch

from kdcompress.common import tracking
from kdcompress.common.checkpoint import load_model
from kdcompress.deploy.profiling import benchmark
from kdcompress.io import write_json
from models import create_model
from pipeline._common import setup, stage


@stage
def main(argv=None):
    args, params = setup(argv, "benchmark", onnx="artifacts/onnx", student="artifacts/student/student.pt",
                         metrics="artifacts/metrics/benchmark.json")
    student = functools.partial(load_model, args.student, torch.device("cpu"), create_model)
    report = benchmark(args.onnx, student, params["benchmark"])
    p50 = {(r, p): report[r][p]["ort_edge"]["p50_ms"] for r in ("student", "teacher") for p in ("fp32", "int8")}
    write_json(args.metrics, report)
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_metrics({k: v for k, v in report.items() if k != "environment"}, prefix="benchmark")
        tracking.log_tags({"benchmark.env": report["environment"]})  # tags: a rerun on another host overwrites
    print("ORT batch-1 p50 (ms): " + ", ".join(f"{r} {p} {v:.3f}" for (r, p), v in p50.items())
          + f"; teacher/student {report['ratios']['teacher_over_student_ort_p50']:.1f}x")


if __name__ == "__main__":
    raise SystemExit(main())
