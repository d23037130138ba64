"""Stage 4: teacher and student on the same test split: accuracy, calibration, agreement;
reliability diagrams and the student's confusion matrix as DVC plots."""

from __future__ import annotations

from pathlib import Path

from kdcompress.common import tracking
from kdcompress.common.checkpoint import load_model
from kdcompress.data.loader import make_loader
from kdcompress.data.prepared import load_prepared
from kdcompress.io import write_csv, write_json
from kdcompress.report import figures
from kdcompress.report.metrics import confusion_matrix, evaluation
from kdcompress.runtime import resolve_device
from kdcompress.training.loop import predict
from models import create_model
from pipeline._common import setup, stage


@stage
def main(argv=None):
    args, params = setup(argv, "evaluate", data="artifacts/data", teacher="artifacts/teacher/teacher.pt",
                         student="artifacts/student/student.pt", metrics="artifacts/metrics/evaluate.json",
                         plots="artifacts/plots")
    device = resolve_device(params["base"].device)
    cfg = params["evaluate"]
    data = load_prepared(args.data, splits=("test",))
    test = make_loader(data, "test", device, cfg.batch_size, workers=params["data"].workers)
    logits = {}
    for role, path in (("teacher", args.teacher), ("student", args.student)):
        logits[role], labels = predict(load_model(path, device, create_model, data), test, desc=f"test {role}")
    report, bins = evaluation(logits["teacher"], logits["student"], labels, cfg.ece_bins)
    plots = Path(args.plots)
    for role in logits:
        write_csv(plots / f"reliability_{role}.csv", bins[role])
    pred = logits["student"].argmax(1)
    write_csv(plots / "confusion.csv", [{"actual": data.classes[a], "predicted": data.classes[p]}
                                        for a, p in zip(labels.tolist(), pred.tolist())])
    matrix = confusion_matrix(pred, labels, len(data.classes)).numpy()
    images = {"reliability.png": figures.reliability(bins), "confusion.png": figures.confusion(matrix, data.classes)}
    with tracking.resume_run("teacher", args.teacher, "teacher"):
        tracking.log_metrics(report["teacher"], prefix="test")
    with tracking.resume_run("student", args.student, "student"):
        tracking.log_metrics(report["student"], prefix="test")
        tracking.log_metrics(report["teacher"], prefix="teacher_test")
        for name in ("reliability_student.csv", "reliability_teacher.csv", "confusion.csv"):
            tracking.log_artifact(plots / name, "evaluate")
        for name, fig in images.items():
            tracking.log_figure(fig, name, plots / name)
    write_json(args.metrics, report)
    s, t = report["student"], report["teacher"]
    print(f"test top1: teacher {t['top1']:.4f}, student {s['top1']:.4f}; student ECE {s['ece']:.4f}, "
          f"agreement {s['agreement']:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
