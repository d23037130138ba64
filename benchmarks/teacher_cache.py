"""The teacher-output cache on a sweep: a CE run, then the same KD run twice, the first filling a
fresh cache (miss: the live teacher, as without a cache) and the second reading it (hit), one after
the other in one process on the method benchmark's pinned teacher and student. Prints each run's
training time, its ratio to the CE run, and the test accuracy of both KD runs (equal: a hit trains
to the same weights).

    python -m benchmarks.teacher_cache [--epochs 10] [-S key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from benchmarks._runs import pin_teacher, run_student, sweep_arguments


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sweep_arguments(p, seeds=[0])
    p.add_argument("--method", default="kd")
    args = p.parse_args()
    overrides = {"distill.student": "tinycnn",
                 **{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}}
    out = Path(args.out)
    teacher, _ = pin_teacher({}, out / "methods.json")
    root = out / "runs" / "teacher_cache"
    shutil.rmtree(root, ignore_errors=True)
    os.environ["KDCOMPRESS_CACHE_DIR"] = str(root / "cache")
    rows = {}
    for name, method in (("ce", "ce"), ("miss", args.method), ("hit", args.method)):
        t0 = time.perf_counter()
        result = run_student(name, root, {**overrides, "distill.method": method,
                                          "base.seed": args.seeds[0]}, teacher=teacher, ship=False)
        rows[name] = {"wall_seconds": time.perf_counter() - t0, "train_seconds": result["train_seconds"],
                      "top1": result["top1"]}
        print(name, rows[name], flush=True)
    for name, row in rows.items():
        row["train_over_ce"] = row["train_seconds"] / rows["ce"]["train_seconds"]
    (out / "teacher_cache.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'run':10} {'train s':>8} {'x CE':>6} {'top1':>7}")
    for name, row in rows.items():
        print(f"{name:10} {row['train_seconds']:8.1f} {row['train_over_ce']:6.2f} {100 * row['top1']:7.2f}")


if __name__ == "__main__":
    main()
