"""Stage 6: onnxruntime CPU latency of teacher and student (edge profile: batch 1, one thread,
sequential; server profile: batch 64, all cores) and the student on PyTorch eager for the ratio."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdcompress import tracking
from kdcompress.export import read_metadata
from kdcompress.io import write_json
from kdcompress.profiling import environment, ort_latency, ort_throughput, torch_latency
from pipeline._common import load_model, setup, stage


@stage
def main(argv=None):
    args, params, _ = setup(argv, "benchmark", onnx="artifacts/onnx", teacher="artifacts/teacher/teacher.pt",
                            student="artifacts/student/student.pt", metrics="artifacts/metrics/benchmark.json")
    cfg, report = params["benchmark"], {}
    for role, ckpt in (("student", args.student), ("teacher", args.teacher)):
        model = load_model(ckpt, torch.device("cpu"))
        onnx_path = Path(args.onnx) / f"{role}.onnx"
        input_shape = json.loads(read_metadata(onnx_path)["input_shape"])[1:]
        report[role] = {
            "ort_edge": ort_latency(onnx_path, input_shape, 1, 1, cfg.warmup, cfg.runs),
            "ort_server": ort_throughput(onnx_path, input_shape, cfg.server_batch, 0, 5, cfg.server_runs),
            "torch_edge": torch_latency(model, input_shape, 1, 1, cfg.warmup, cfg.runs),
        }
    s, t = report["student"], report["teacher"]
    report["ratios"] = {
        "teacher_over_student_ort_p50": t["ort_edge"]["p50_ms"] / s["ort_edge"]["p50_ms"],
        "student_torch_over_ort_p50": s["torch_edge"]["p50_ms"] / s["ort_edge"]["p50_ms"],
        "student_over_teacher_server_throughput": s["ort_server"]["images_per_s"] / t["ort_server"]["images_per_s"],
    }
    report["environment"] = {**environment(), "edge_threads": 1, "server_threads": "all",
                             "server_batch": cfg.server_batch}
    write_json(args.metrics, report)
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_metrics({k: v for k, v in report.items() if k != "environment"}, prefix="benchmark")
        tracking.log_params({"benchmark.env": report["environment"]})
    r = report["ratios"]
    print(f"ORT batch-1 p50: student {s['ort_edge']['p50_ms']:.3f} ms, teacher {t['ort_edge']['p50_ms']:.3f} ms "
          f"({r['teacher_over_student_ort_p50']:.1f}x); student torch/ORT {r['student_torch_over_ort_p50']:.1f}x")


if __name__ == "__main__":
    raise SystemExit(main())
