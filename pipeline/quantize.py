"""Stage 6: static int8 (QDQ) twins of the exported student and teacher, calibrated on a seeded sample
of training images. The accuracy gate decides on the whole val split; fp32 and int8 top-1 on the whole
test split are reported beside it, never used to decide. A model that fails the gate is written for
inspection; the ship stage never ships it."""

from __future__ import annotations

from kdcompress.common import tracking
from kdcompress.common.int8 import calibration_batches, int8_path, quantize
from kdcompress.common.onnx import METADATA_KEYS, ort_predict_many, read_metadata
from kdcompress.data.loader import make_loader
from kdcompress.data.prepared import load_prepared
from kdcompress.deploy.quantize import accuracy, gate
from kdcompress.io import write_json
from pipeline._common import setup, stage

SPLITS = ("val", "test")  # the gate's (decision), then the reported one


@stage
def main(argv=None):
    args, params = setup(argv, "quantize", data="artifacts/data", onnx="artifacts/onnx",
                            student="artifacts/student/student.pt", metrics="artifacts/metrics/quantize.json")
    cfg, seed = params["quantize"], params["base"].seed
    paths = {role: f"{args.onnx}/{role}.onnx" for role in ("student", "teacher")}
    for path in paths.values():
        read_metadata(path, METADATA_KEYS)
    data = load_prepared(args.data, splits=("train", *SPLITS))
    workers = params["data"].workers
    calibration = make_loader(data, "train", "cpu", 64, workers=workers)
    models = {}
    for role, fp32 in paths.items():
        models[role, "int8"] = quantize(fp32, int8_path(fp32), calibration_batches(calibration, cfg.samples, seed),
                                        cfg.calibration, cfg.per_channel)
        models[role, "fp32"] = fp32
    logits = {split: ort_predict_many(models, (x.numpy() for x, _, _ in make_loader(
        data, split, "cpu", params["evaluate"].batch_size, workers=workers).batches())) for split in SPLITS}
    report = {}
    for role in paths:
        figures = {split: accuracy(logits[split][role, "fp32"], logits[split][role, "int8"],
                                   getattr(data, split).labels.numpy()) for split in SPLITS}
        report[role] = {**figures, **gate(figures["val"], cfg.max_drop), "calibration": cfg.calibration,
                        "calibration_samples": min(cfg.samples, len(data.train)), "per_channel": cfg.per_channel}
    write_json(args.metrics, report)
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_metrics(report, prefix="quantize")
    for role, r in report.items():
        val, test = r["val"], r["test"]
        print(f"int8 {role}: val top-1 {val['int8_top1']:.4f} vs fp32 {val['fp32_top1']:.4f} "
              f"({val['drop_points']:+.2f} points drop, agreement {val['agreement']:.2%}): gate "
              f"{'passed' if r['passed'] else 'FAILED'}; test top-1 (reported) {test['int8_top1']:.4f} vs fp32 "
              f"{test['fp32_top1']:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
