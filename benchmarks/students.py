"""The accuracy-latency front: several student architectures distilled from the same pinned teacher,
each through the whole pipeline (distill, evaluate, export, quantize, benchmark), logged to MLflow.

    python -m benchmarks.students [--students tinycnn mobilenet ...] [--seeds 0] [--jobs 2] [-S key=value]

Needs `dvc repro prepare` first. Uses the method benchmark's pinned teacher
(benchmarks/results/methods_teacher.pt). Finished runs are kept in benchmarks/results/students.json;
an interrupted sweep resumes. `python -m pipeline.leaderboard` then draws the front from MLflow.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from benchmarks._runs import SWEEP_EPOCHS, pin_teacher, read_sweep, run_student, sweep_arguments
from kdcompress.io import atomic_write, write_json

STUDENTS = ["tinycnn", "tinycnn:16-32-128", "tinycnn:16-48-96", "tinycnn:32-64-128", "mobilenet:16", "mobilenet"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", nargs="+", default=STUDENTS)
    p.add_argument("--remeasure", action="store_true",
                   help="benchmark and ship every recorded run again, one after another, so that all the table's "
                        "latencies come from one sitting (run it on an otherwise idle machine)")
    sweep_arguments(p, seeds=[0])
    args = p.parse_args(argv)
    overrides, results_path, results = read_sweep(args, "students")
    out = Path(args.out)
    teacher, teacher_sha = pin_teacher(results, out / "methods.json")
    if args.remeasure:
        for name in results:
            student, tag, seed = parse_key(name)
            folder = out / "runs" / folder_of(student, seed, tag)
            for stale in ("benchmark.json", "summary.json"):
                (folder / stale).unlink(missing_ok=True)
            results[name].update(run_student(folder_of(student, seed, tag), out / "runs", {},
                                             params_path=str(folder / "params.yaml"), teacher=teacher, ship=True))
            write_json(results_path, results)
        atomic_write(out / "students.md", table(results), text=True)
        print(table(results))
        return
    if args.jobs > 1:
        overrides["base.num_threads"] = max(1, (os.cpu_count() or 1) // args.jobs)
    tag = ",".join(f"{k}={v}" for k, v in sorted(overrides.items())  # the key's tag: what differs from the sweeps'
                   if k != "base.num_threads" and (k, v) != ("distill.epochs", SWEEP_EPOCHS))
    todo = [(s, seed) for seed in args.seeds for s in args.students if key(s, seed, tag) not in results]
    folders = {run: folder_of(run[0], run[1], tag) for run in todo}
    failed = []
    # training side by side; then export, quantize, benchmark and ship one at a time, so that no
    # latency is measured while another job loads the cores
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        running = {pool.submit(run_student, folders[run], out / "runs",
                               {**overrides, "distill.student": run[0], "base.seed": run[1]}, teacher=teacher): run
                   for run in todo}
        for done in as_completed(running):
            try:
                done.result()
            except (Exception, SystemExit) as err:  # keep going; a rerun retries what failed
                failed.append(f"{key(*running[done], tag)}: {err}")
                todo.remove(running[done])
    for student, seed in todo:
        result = run_student(folders[student, seed], out / "runs",
                             {**overrides, "distill.student": student, "base.seed": seed}, teacher=teacher, ship=True)
        results = read_sweep(args, "students")[2]  # another sweep may have added runs meanwhile
        results[key(student, seed, tag)] = {**result, "jobs": args.jobs, "teacher_sha": teacher_sha}
        write_json(results_path, results)
        atomic_write(out / "students.md", table(results), text=True)
    print(table(results))
    if failed:
        raise SystemExit("failed runs (not recorded): " + "; ".join(failed))


def table(results: dict) -> str:
    """One row per run: accuracy and its gap to the fp32 teacher, fp32 and int8 latency (onnxruntime,
    batch 1, 1 thread, measured one run at a time), the int8 gate, what ships and its speed-up."""
    rows = ["| student | top-1 (fp32) | gap of what ships to the teacher (points) | ECE | fp32 p50 ms | int8 p50 ms "
            "| int8 val top-1 (gate) | ships | speed-up vs fp32 teacher | size KiB |", "|" + " --- |" * 10]
    def p50(run: dict, role: str, precision: str) -> float:
        return run["benchmark"][role][precision]["ort_edge"]["p50_ms"]

    for name, r in sorted(results.items(), key=lambda kv: p50(kv[1], "student", "fp32")):
        gate, ship = r["quantize"]["student"], r["ship"]
        rows.append(" | ".join([
            f"| {name.rsplit('/', 1)[0]}", f"{r['top1']:.2%}", f"{ship['test']['gap_points']:.2f}", f"{r['ece']:.3f}",
            f"{p50(r, 'student', 'fp32'):.4f}", f"{p50(r, 'student', 'int8'):.4f}",
            f"{gate['val']['int8_top1']:.2%} ({'pass' if gate['passed'] else 'fail'})",
            "int8" if ship["int8_shipped"] else "fp32",
            f"{ship['speedup_vs_teacher']:.1f}x (teacher {p50(r, 'teacher', 'fp32'):.3f} ms)",
            f"{ship['size_kib']:.0f} |"]))
    return "\n".join(rows) + "\n"


def key(student: str, seed: int, tag: str) -> str:
    return f"{student}{'|' + tag if tag else ''}/seed{seed}"


def parse_key(name: str) -> tuple[str, str, int]:
    """``(student, tag, seed)`` of a results key (the inverse of ``key``)."""
    run, seed = name.rsplit("/seed", 1)
    student, _, tag = run.partition("|")
    return student, tag, int(seed)


def folder_of(student: str, seed: int, tag: str) -> str:
    return f"students/{student.replace(':', '_')}{tag and '_' + tag}_seed{seed}"


if __name__ == "__main__":
    main()
