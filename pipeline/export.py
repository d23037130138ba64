"""Stage 5: student (and teacher, for the comparison) to ONNX, checked, with a parity gate on
the whole val split and metadata; the student is logged as an MLflow model."""

from __future__ import annotations

from pathlib import Path

import torch

from kdcompress.common import tracking
from kdcompress.common.checkpoint import load_model
from kdcompress.common.onnx import parity, save_onnx, to_onnx
from kdcompress.data.loader import make_loader
from kdcompress.data.prepared import load_prepared
from kdcompress.deploy.export import metadata_for
from kdcompress.deploy.profiling import count_macs, count_params
from kdcompress.io import file_sha, write_json
from kdcompress.training.loop import predict
from models import create_model
from pipeline._common import setup, stage


@stage
def main(argv=None):
    args, params = setup(argv, "export", data="artifacts/data", teacher="artifacts/teacher/teacher.pt",
                         student="artifacts/student/student.pt",
                         out="artifacts/onnx", metrics="artifacts/metrics/export.json")
    cfg, device = params["export"], torch.device("cpu")
    data = load_prepared(args.data, splits=("val",))  # parity is a gate: decided on val, like every choice
    val = make_loader(data, "val", device, params["evaluate"].batch_size, workers=params["data"].workers)
    out, report, protos, metas = Path(args.out), {}, {}, {}
    for role, path in (("student", args.student), ("teacher", args.teacher)):
        model = load_model(path, device, create_model, data)
        metas[role] = metadata_for(role, model.arch, data.classes, data.mean, data.std, data.input_shape, cfg.opset,
                                   data.geometry.crop_fraction)
        protos[role] = to_onnx(model, data.input_shape, cfg.opset, metas[role])
        serialized = protos[role].SerializeToString()
        torch_logits, _ = predict(model, val, desc=f"parity {role}")
        report[role] = {**parity(serialized, torch_logits, (x for x, _, _ in val.batches()), cfg.atol,
                                 name=str(out / f"{role}.onnx")),
                        "file_bytes": len(serialized), "params": count_params(model),
                        "macs": count_macs(model, data.input_shape)}
    for role, proto in protos.items():  # written only once both passed the parity gate
        save_onnx(proto, out / f"{role}.onnx")
    s = report["student"]
    write_json(args.metrics, report)
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_metrics({"export": report})
        tracking.log_tags({"kdcompress.teacher": metas["teacher"]["kdcompress.architecture"],
                           "kdcompress.teacher_sha": file_sha(args.teacher)})
        tracking.log_onnx(protos["student"], data.input_shape)
    print(f"exported student ({s['file_bytes'] / 1024:.1f} KiB, parity max |dlogit| {s['max_abs_diff']:.2e}, "
          f"agreement {s['top1_agreement']:.2%}) and teacher to {out}")


if __name__ == "__main__":
    raise SystemExit(main())
