"""Stage 7: onnxruntime CPU figures of the student and the teacher, fp32 and int8: edge profile
(batch 1, one thread, sequential; p50/p90/p99), server profile (batch 64, all cores; throughput),
peak memory of loading and running each model, file size; the fp32 student on PyTorch eager for the ratio."""

from __future__ import annotations

import json

import torch

from kdcompress import tracking
from kdcompress.export import METADATA_KEYS, read_metadata
from kdcompress.io import write_json
from kdcompress.profiling import environment, onnx_size, ort_latency, ort_peak_memory, ort_throughput, torch_latency
from kdcompress.quantize import int8_path
from pipeline._common import load_model, setup, stage


@stage
def main(argv=None):
    args, params, _ = setup(argv, "benchmark", onnx="artifacts/onnx", student="artifacts/student/student.pt",
                            metrics="artifacts/metrics/benchmark.json")
    cfg, report = params["benchmark"], {}
    for role in ("student", "teacher"):
        fp32 = f"{args.onnx}/{role}.onnx"
        report[role] = {}
        for precision, path in (("fp32", fp32), ("int8", int8_path(fp32))):
            input_shape = json.loads(read_metadata(path, METADATA_KEYS)["input_shape"])[1:]
            report[role][precision] = {
                "ort_edge": ort_latency(path, input_shape, 1, 1, cfg.warmup, cfg.runs),
                "ort_server": ort_throughput(path, input_shape, cfg.server_batch, 0, 5, cfg.server_runs),
                "memory_edge": ort_peak_memory(path, input_shape, 1, 1),
                "memory_server": ort_peak_memory(path, input_shape, cfg.server_batch, 0),
                "file_bytes": onnx_size(path),
            }
    report["student"]["fp32"]["torch_edge"] = torch_latency(load_model(args.student, torch.device("cpu")), input_shape,
                                                            1, 1, cfg.warmup, cfg.runs)
    p50 = {(r, p): report[r][p]["ort_edge"]["p50_ms"] for r in ("student", "teacher") for p in ("fp32", "int8")}
    s = report["student"]["fp32"]
    report["ratios"] = {
        "teacher_over_student_ort_p50": p50["teacher", "fp32"] / p50["student", "fp32"],
        "student_int8_speedup_p50": p50["student", "fp32"] / p50["student", "int8"],
        "teacher_int8_speedup_p50": p50["teacher", "fp32"] / p50["teacher", "int8"],
        "student_torch_over_ort_p50": s["torch_edge"]["p50_ms"] / s["ort_edge"]["p50_ms"],
        "student_over_teacher_server_throughput": (s["ort_server"]["images_per_s"]
                                                   / report["teacher"]["fp32"]["ort_server"]["images_per_s"]),
    }
    report["environment"] = {**environment(), "edge_threads": 1, "server_threads": "all",
                             "server_batch": cfg.server_batch}
    write_json(args.metrics, report)
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_metrics({k: v for k, v in report.items() if k != "environment"}, prefix="benchmark")
        tracking.log_tags({"benchmark.env": report["environment"]})  # tags: a rerun on another host overwrites
    print("ORT batch-1 p50 (ms): " + ", ".join(f"{r} {p} {v:.3f}" for (r, p), v in p50.items())
          + f"; teacher/student {report['ratios']['teacher_over_student_ort_p50']:.1f}x")


if __name__ == "__main__":
    raise SystemExit(main())
