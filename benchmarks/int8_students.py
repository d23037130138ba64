"""int8 on distilled students: fp32, naive int8 and the quantize stage's best int8 of each, with latency and
val/test top-1, then quantization-aware fine-tuning of the student that post-training int8 hurts most.

    python -m benchmarks.int8_students [--students tv:mobilenet_v3_small ...] [--teacher-epochs 3] \\
        [-S distill.epochs=2] [--qat-epochs 1]

Needs `dvc repro prepare` with the image size to measure at (e.g. `data.image_size: 64` in params.yaml). A
ResNet-20 teacher is trained once on that data (--teacher-epochs, the teacher section as in params) and pinned
beside the results. Each student then runs the real stages (distill, evaluate, export, quantize with its search,
benchmark, ship: ``benchmarks._runs.run_student``). The latencies are the search's own (batch 1, one thread,
fp32 and every candidate interleaved block by block in one process), so the three latencies of a row were
measured side by side. Last, the student whose naive int8 loses the most val top-1 runs the quantize stage again
on its exported files with ``quantize.qat_epochs`` (its int8 files in ``onnx_qat/``): post-training against
quantization-aware int8, val and test. Finished parts are kept in benchmarks/results/int8_students.json; an
interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks._runs import pin_teacher, read_sweep, run_student, sweep_arguments, train_teacher, write_params
from kdcompress.io import atomic_write, write_json
from pipeline import quantize

STUDENTS = ["tv:mobilenet_v3_small", "tv:mobilenet_v3_large", "tv:efficientnet_b0", "tv:shufflenet_v2_x1_0",
            "tv:resnet18"]


def row(student: str, r: dict) -> dict:
    """The table's figures of one student run: fp32, naive (``all``) and best int8 latency and top-1."""
    q = r["quantize"]["student"]
    search = {s["config"]["name"]: s for s in q["search"]}
    best = search.get(q["chosen"]) if q["chosen"] else None
    return {"student": student, "fp32_ms": q["fp32_p50_ms"], "fp32_val": q["val"]["fp32_top1"],
            "fp32_test": q["test"]["fp32_top1"],
            "naive_ms": search["all"]["p50_ms"], "naive_val": q["compared"]["all"]["val_int8_top1"],
            "naive_test": q["compared"]["all"]["test_int8_top1"],
            "best": q["chosen"], "best_ms": best["p50_ms"] if best else None,
            "best_val": q["val"]["int8_top1"] if best else None, "best_test": q["test"]["int8_top1"] if best else None,
            "shipped": "int8" if r["ship"]["int8_shipped"] else "fp32", "cpu": q["search_profile"]["cpu"]}


def table(results: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    def ms(v, fp32):
        return "-" if v is None else f"{v:.3f} ({fp32 / v:.2f}x)"

    lines = ["| student | fp32 ms | fp32 val / test | naive int8 ms (x fp32) | naive val / test | best int8 | "
             "best ms (x fp32) | best val / test | ships |", "|" + " --- |" * 9]
    for key, r in results.items():
        if not key.startswith("student/"):
            continue
        x = row(key.split("/", 1)[1], r)
        lines.append(f"| `{x['student']}` | {x['fp32_ms']:.3f} | {pct(x['fp32_val'])} / {pct(x['fp32_test'])} | "
                     f"{ms(x['naive_ms'], x['fp32_ms'])} | {pct(x['naive_val'])} / {pct(x['naive_test'])} | "
                     f"{x['best'] or 'none passed'} | {ms(x['best_ms'], x['fp32_ms'])} | {pct(x['best_val'])} / "
                     f"{pct(x['best_test'])} | {x['shipped']} |")
    if "qat" in results:
        q = results["qat"]
        c = q["report"]["student"]["compared"]
        lines += ["", f"QAT ({q['epochs']} epochs) on `{q['student']}`: naive post-training int8 val / test "
                  f"{pct(c['all']['val_int8_top1'])} / {pct(c['all']['test_int8_top1'])}, quantization-aware "
                  f"{pct(c['qat-all']['val_int8_top1'])} / {pct(c['qat-all']['test_int8_top1'])}; chosen "
                  f"{q['report']['student']['chosen']} (source {q['report']['student']['source']})."]
    return "\n".join(lines)


def qat_run(student: str, folder: Path, teacher: Path, epochs: int) -> dict:
    """The quantize stage again on ``folder``'s exported student, with quantize.qat_epochs: ``epochs``."""
    params = write_params(folder / "qat", {"quantize.qat_epochs": epochs}, str(folder / "params.yaml"))
    onnx = folder / "onnx_qat"
    onnx.mkdir(exist_ok=True)
    for role in ("student", "teacher"):
        shutil.copyfile(folder / "onnx" / f"{role}.onnx", onnx / f"{role}.onnx")
    out = folder / "qat" / "quantize.json"
    if not out.exists() and quantize.main(["--params", str(folder / "qat" / "params.yaml"), "--onnx", str(onnx),
                                           "--student", str(folder / "student.pt"), "--teacher", str(teacher),
                                           "--metrics", str(out)]):
        raise SystemExit(f"{student}: quantize with QAT failed")
    return {"student": student, "epochs": params["quantize"]["qat_epochs"], "report": json.loads(out.read_text())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", nargs="+", default=STUDENTS)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--qat-epochs", type=int, default=1)
    sweep_arguments(p, seeds=[0])
    args = p.parse_args(argv)
    overrides, results_path, results = read_sweep(args, "int8_students")
    out = Path(args.out)
    runs = out / "runs" / "int8_students"
    teacher, _ = pin_teacher(results, results_path, lambda: train_teacher(
        "resnet20", runs / "teacher", params_path=str(write_teacher_params(runs, args.teacher_epochs))))
    for student in args.students:
        key = f"student/{student}"
        if key not in results:
            results[key] = run_student(student.replace(":", "_"), runs, {**overrides, "distill.student": student},
                                       teacher=teacher, ship=True)
            write_json(results_path, results)
        print(table(results), flush=True)
    if args.qat_epochs and "qat" not in results:
        worst = max((k for k in results if k.startswith("student/")),
                    key=lambda k: row(k, results[k])["fp32_val"] - row(k, results[k])["naive_val"])
        student = worst.split("/", 1)[1]
        results["qat"] = qat_run(student, runs / student.replace(":", "_"), teacher, args.qat_epochs)
        write_json(results_path, results)
    text = table(results)
    atomic_write(results_path.with_suffix(".md"), text + "\n")
    print(text)


def write_teacher_params(runs: Path, epochs: int) -> Path:
    """params.yaml with teacher.epochs: ``epochs``, for the pinned teacher."""
    write_params(runs / "teacher_params", {"teacher.epochs": epochs})
    return runs / "teacher_params" / "params.yaml"


if __name__ == "__main__":
    main()
