"""Stage 8: the shipping decision and `artifacts/ship/`, exactly what a user copies to a device: the
chosen student as `model.onnx` (int8 only where it passed the gate on val and is faster at batch 1; then
the fp32 twin beside it as `model.fp32.onnx`), the torch-free `predict.py` and `MODEL_CARD.md`. The
decision reads only val figures; the card, summary.json and MLflow give test figures beside them."""

from __future__ import annotations

import shutil
from pathlib import Path

from kdcompress.common import tracking
from kdcompress.common.int8 import int8_path
from kdcompress.common.onnx import METADATA_KEYS, read_metadata
from kdcompress.deploy import predict
from kdcompress.deploy.ship import decide, summary
from kdcompress.io import atomic_dir, read_json, write_json
from kdcompress.report.card import card
from kdcompress.types import UserError
from pipeline._common import parser, stage


@stage
def main(argv=None):
    args = parser("ship", params=False, onnx="artifacts/onnx", student="artifacts/student/student.pt",
                  evaluation="artifacts/metrics/evaluate.json", export="artifacts/metrics/export.json",
                  quantization="artifacts/metrics/quantize.json",
                  benchmark="artifacts/metrics/benchmark.json", out="artifacts/ship",
                  metrics="artifacts/metrics/summary.json").parse_args(argv)
    evaluation, export = read_json(args.evaluation, "evaluate"), read_json(args.export, "export")
    quant, bench = read_json(args.quantization, "quantize"), read_json(args.benchmark, "benchmark")
    fp32 = Path(args.onnx) / "student.onnx"
    models = {"fp32": fp32, "int8": int8_path(fp32)}
    metadata = {p: read_metadata(path, METADATA_KEYS) for p, path in models.items()}
    try:
        edge = {p: bench["student"][p]["ort_edge"]["p50_ms"] for p in models}
        precision, reason = decide(quant["student"], edge["fp32"], edge["int8"])
        text = card(metadata[precision], precision, reason, evaluation, export, quant, bench)
        figures = summary(precision, evaluation, quant["student"], bench)
    except KeyError as err:
        raise UserError(f"{args.export}, {args.benchmark} or {args.quantization}: key {err} missing; rerun those "
                        "stages") from None
    with atomic_dir(args.out) as out:
        shutil.copyfile(models[precision], out / "model.onnx")
        if precision == "int8":
            shutil.copyfile(fp32, out / "model.fp32.onnx")
        shutil.copyfile(predict.__file__, out / "predict.py")
        (out / "MODEL_CARD.md").write_text(text)
    write_json(args.metrics, figures)
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_tags({"kdcompress.shipped": precision, "kdcompress.ship_reason": reason})
        tracking.log_metrics(figures, prefix="ship")
        tracking.log_artifact(Path(args.out) / "MODEL_CARD.md", "ship")
    print(f"shipped {precision} student to {args.out}: {reason}")


if __name__ == "__main__":
    raise SystemExit(main())
