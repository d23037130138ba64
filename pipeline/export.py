"""Stage 5: student (and teacher, for the comparison) to ONNX, checked, with a parity gate on
the whole test set, metadata and a model card; the student is logged as an MLflow model."""

from __future__ import annotations

from pathlib import Path

import torch

from kdcompress import tracking
from kdcompress.data import load_prepared
from kdcompress.export import metadata_for, model_card, parity, save_onnx, to_onnx
from kdcompress.io import atomic_write, read_json, write_json
from kdcompress.profiling import count_macs, count_params
from kdcompress.train import predict
from pipeline._common import load_model, loader, setup, stage


@stage
def main(argv=None):
    args, params, _ = setup(argv, "export", data="artifacts/data", teacher="artifacts/teacher/teacher.pt",
                            student="artifacts/student/student.pt", evaluation="artifacts/metrics/evaluate.json",
                            out="artifacts/onnx", metrics="artifacts/metrics/export.json")
    cfg, device = params["export"], torch.device("cpu")
    data = load_prepared(args.data, splits=("test",))
    test = loader(data.test, {"mean": data.mean, "std": data.std}, device, 1024)
    test_metrics = read_json(args.evaluation, "evaluate")["student"]
    out, report, protos, metas = Path(args.out), {}, {}, {}
    for role, path in (("student", args.student), ("teacher", args.teacher)):
        model = load_model(path, device, data)
        metas[role] = metadata_for(role, model.arch, data.classes, data.mean, data.std, data.input_shape, cfg.opset)
        protos[role] = to_onnx(model, data.input_shape, cfg.opset, metas[role])
        serialized = protos[role].SerializeToString()
        torch_logits, _ = predict(model, test, desc=f"parity {role}")
        report[role] = {**parity(serialized, torch_logits, (x for x, _, _ in test.batches()), cfg.atol,
                                 name=str(out / f"{role}.onnx")),
                        "file_bytes": len(serialized), "params": count_params(model),
                        "macs": count_macs(model, data.input_shape)}
    for role, proto in protos.items():  # written only once both passed the parity gate
        save_onnx(proto, out / f"{role}.onnx")
    s = report["student"]
    card = model_card("student", metas["student"], s, test_metrics, s["params"], s["macs"], s["file_bytes"],
                      params["distill"].method)
    atomic_write(out / "student.md", card, text=True)
    write_json(args.metrics, report)
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_metrics({"export": report})
        tracking.log_tags({"kdcompress.teacher": metas["teacher"]["kdcompress.architecture"],
                           "kdcompress.teacher_sha": tracking.file_sha(args.teacher)})
        tracking.log_onnx(protos["student"], data.input_shape)
        tracking.log_artifact(out / "student.md", "export")
    print(f"exported student ({s['file_bytes'] / 1024:.1f} KiB, parity max |dlogit| {s['max_abs_diff']:.2e}, "
          f"agreement {s['top1_agreement']:.2%}) and teacher to {out}")


if __name__ == "__main__":
    raise SystemExit(main())
