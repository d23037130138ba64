"""Stage 6: static int8 (QDQ) twins of the exported student and teacher (kdcompress.deploy.int8_twins): the
student's is the fastest configuration that passes the accuracy gate on val, optionally after
quantization-aware fine-tuning under its distillation loss (quantize.qat_epochs, kdcompress.training.qat); test
top-1 is only reported. A model that fails the gate is written for inspection; the ship stage never ships it."""

from __future__ import annotations

from kdcompress.common import tracking
from kdcompress.common.int8 import calibration_batches
from kdcompress.common.onnx import METADATA_KEYS, read_metadata
from kdcompress.data.loader import make_loader
from kdcompress.data.prepared import load_prepared
from kdcompress.deploy.int8_search import for_tracking
from kdcompress.deploy.int8_twins import SPLITS, quantize_twins
from kdcompress.io import write_json
from kdcompress.training import qat
from models import create_model
from pipeline._common import setup, stage


@stage
def main(argv=None):
    args, params = setup(argv, "quantize", data="artifacts/data", onnx="artifacts/onnx",
                         student="artifacts/student/student.pt", teacher="artifacts/teacher/teacher.pt",
                         metrics="artifacts/metrics/quantize.json")
    cfg, seed, workers = params["quantize"], params["base"].seed, params["data"].workers
    for role in ("student", "teacher"):  # a bad file fails before any work
        read_metadata(f"{args.onnx}/{role}.onnx", METADATA_KEYS)
    data = load_prepared(args.data, splits=("train", *SPLITS))
    calibration = make_loader(data, "train", "cpu", 64, workers=workers)
    report = quantize_twins(
        cfg, args.onnx, {split: getattr(data, split).labels.numpy() for split in SPLITS},
        lambda split: (x.numpy() for x, _, _ in make_loader(data, split, "cpu", params["evaluate"].batch_size,
                                                            workers=workers).batches()),
        lambda: calibration_batches(calibration, cfg.samples, seed), min(cfg.samples, len(data.train)),
        (lambda folder: qat.fine_tuned_onnx(params, args, create_model, folder)) if cfg.qat_epochs else None)
    write_json(args.metrics, report)
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_metrics(for_tracking(report), prefix="quantize")
        tracking.log_tags({**{f"quantize.{r}.chosen": str(report[r]["chosen"]) for r in report},
                           "quantize.student.source": report["student"]["source"]})
    for r, q in report.items():
        print(f"int8 {r} ({q['config']['name']}, of {len(q.get('search', [])) or 1} configurations): val top-1 "
              f"{q['val']['int8_top1']:.4f} vs fp32 {q['val']['fp32_top1']:.4f} ({q['val']['drop_points']:+.2f} points "
              f"drop): gate {'passed' if q['passed'] else 'FAILED'}; test top-1 (reported) {q['test']['int8_top1']:.4f}"
              f" vs fp32 {q['test']['fp32_top1']:.4f}")
    if "qat" in report["student"]:
        c = report["student"]["compared"]
        print("int8 student, post-training vs quantization-aware (configuration all): val top-1 "
              f"{c['all']['val_int8_top1']:.4f} vs {c['qat-all']['val_int8_top1']:.4f}; test (reported) "
              f"{c['all']['test_int8_top1']:.4f} vs {c['qat-all']['test_int8_top1']:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
