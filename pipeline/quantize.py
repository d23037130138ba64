"""Stage 6: static int8 (QDQ) twins of the exported student and teacher, calibrated on a seeded sample
of training images, each checked by the accuracy gate on the whole test split. A model that fails
the gate is written for inspection; the ship stage never ships it."""

from __future__ import annotations

from kdcompress.common import tracking
from kdcompress.common.int8 import calibration_batches, int8_path, quantize
from kdcompress.common.onnx import METADATA_KEYS, ort_predict, read_metadata
from kdcompress.data.loader import make_loader
from kdcompress.data.prepared import load_prepared
from kdcompress.deploy.quantize import gate
from kdcompress.io import write_json
from pipeline._common import setup, stage


@stage
def main(argv=None):
    args, params = setup(argv, "quantize", data="artifacts/data", onnx="artifacts/onnx",
                            student="artifacts/student/student.pt", metrics="artifacts/metrics/quantize.json")
    cfg, seed = params["quantize"], params["base"].seed
    paths = {role: f"{args.onnx}/{role}.onnx" for role in ("student", "teacher")}
    for path in paths.values():
        read_metadata(path, METADATA_KEYS)
    data = load_prepared(args.data, splits=("train", "test"))
    calibration = make_loader(data, "train", "cpu", 64)
    test = [x.numpy() for x, _, _ in make_loader(data, "test", "cpu", params["evaluate"].batch_size).batches()]
    labels = data.test.labels.numpy()
    report = {}
    for role, fp32 in paths.items():
        int8 = quantize(fp32, int8_path(fp32), calibration_batches(calibration, cfg.samples, seed),
                        cfg.calibration, cfg.per_channel)
        report[role] = {**gate(ort_predict(fp32, test), ort_predict(int8, test), labels, cfg.max_drop),
                        "calibration": cfg.calibration, "calibration_samples": min(cfg.samples, len(data.train)),
                        "per_channel": cfg.per_channel}
    write_json(args.metrics, report)
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_metrics(report, prefix="quantize")
    for role, r in report.items():
        print(f"int8 {role}: top-1 {r['int8_top1']:.4f} vs fp32 {r['fp32_top1']:.4f} ({r['drop_points']:+.2f} points "
              f"drop, agreement {r['agreement']:.2%}): gate {'passed' if r['passed'] else 'FAILED'}")


if __name__ == "__main__":
    raise SystemExit(main())
