"""Stage 6: static int8 (QDQ) twins of the exported student and teacher, calibrated on a seeded sample of
training images. The student's is the fastest of a bounded list of configurations (batch 1, one thread) that
passes the accuracy gate on val (quantize.search; the teacher keeps SAKD's single configuration); test top-1 is
only reported. A model that fails the gate is written for inspection; the ship stage never ships it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from kdcompress.common import tracking
from kdcompress.common.int8 import calibration_batches
from kdcompress.common.onnx import METADATA_KEYS, ort_predict_many, read_metadata
from kdcompress.data.loader import make_loader
from kdcompress.data.prepared import load_prepared
from kdcompress.deploy.int8_search import Search, for_tracking
from kdcompress.io import write_json
from pipeline._common import setup, stage

SPLITS = ("val", "test")  # the gate's (decision), then the reported one


@stage
def main(argv=None):
    args, params = setup(argv, "quantize", data="artifacts/data", onnx="artifacts/onnx",
                         student="artifacts/student/student.pt", metrics="artifacts/metrics/quantize.json")
    cfg, seed, workers = params["quantize"], params["base"].seed, params["data"].workers
    paths = {role: f"{args.onnx}/{role}.onnx" for role in ("student", "teacher")}
    for path in paths.values():
        read_metadata(path, METADATA_KEYS)
    data = load_prepared(args.data, splits=("train", *SPLITS))
    calibration = make_loader(data, "train", "cpu", 64, workers=workers)
    labels = {split: getattr(data, split).labels.numpy() for split in SPLITS}

    def logits(split: str, models: dict) -> dict:  # one pass over the split for all models
        batches = make_loader(data, split, "cpu", params["evaluate"].batch_size, workers=workers).batches()
        return ort_predict_many(models, (x.numpy() for x, _, _ in batches))

    with tempfile.TemporaryDirectory(prefix="kdcompress-int8-") as tmp:
        searches = {role: Search(fp32, calibration_batches(calibration, cfg.samples, seed), cfg, Path(tmp) / role,
                                 search=cfg.search and role == "student") for role, fp32 in paths.items()}
        val = logits("val", {(r, name): p for r, s in searches.items() for name, p in s.models.items()})
        for r, s in searches.items():
            s.decide({name: val[r, name] for name in s.models}, labels["val"])
        test = logits("test", {(r, name): s.models[name] for r, s in searches.items() for name in ("fp32", s.written)})
        report = {r: s.report({name: test[r, name] for name in ("fp32", s.written)}, labels["test"],
                              min(cfg.samples, len(data.train))) for r, s in searches.items()}
    write_json(args.metrics, report)
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_metrics(for_tracking(report), prefix="quantize")
        tracking.log_tags({f"quantize.{r}.chosen": str(report[r]["chosen"]) for r in report})
    for r, q in report.items():
        print(f"int8 {r} ({q['config']['name']}, of {len(q.get('search', [])) or 1} configurations): val top-1 "
              f"{q['val']['int8_top1']:.4f} vs fp32 {q['val']['fp32_top1']:.4f} ({q['val']['drop_points']:+.2f} points "
              f"drop): gate {'passed' if q['passed'] else 'FAILED'}; test top-1 (reported) {q['test']['int8_top1']:.4f}"
              f" vs fp32 {q['test']['fp32_top1']:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
