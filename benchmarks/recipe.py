"""The default pair's distillation recipe: the 10-epoch `kd` run against one change at a time (learning
rate, temperature, KD weight, weight decay, more epochs), on the method benchmark's pinned teacher,
with the teacher cache on (a sweep's runs share the teacher's outputs, so the wall times are the
student's; `distill.epochs` beyond those already cached pay for the teacher once). Decided on val,
reported on test.

    python -m benchmarks.recipe [--configs default lr_0.2 ...] [--seeds 0] [--jobs 1] [-S key=value]

Needs `dvc repro prepare` first. Prints and writes benchmarks/results/recipe_mobilenet16.{json,md}
(``--name``: another file): val and test top-1 (mean ± std over seeds), the test gap to the teacher,
ECE, distill wall time and the fraction of teacher outputs read from the cache (a run that found the
cache filled costs about a third of one that fills it). Finished runs are kept, so an interrupted
sweep resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._runs import mean_std, pin_teacher, read_sweep, run_all, sweep_arguments
from kdcompress.io import atomic_write

CONFIGS = {
    "default": {},
    "lr_0.2": {"distill.lr": 0.2},
    "lr_0.05": {"distill.lr": 0.05},
    "temperature_2": {"methods.kd.temperature": 2.0},
    "temperature_8": {"methods.kd.temperature": 8.0},
    "kd_only": {"distill.ce_weight": 0.0, "distill.kd_weight": 1.0},
    "weight_decay_1e-4": {"distill.weight_decay": 0.0001},
    "epochs_15": {"distill.epochs": 15},
    "epochs_20": {"distill.epochs": 20},
    "epochs_20_lr_0.2": {"distill.epochs": 20, "distill.lr": 0.2},
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--name", default="recipe_mobilenet16", help="the results file <out>/<name>.json")
    sweep_arguments(p, seeds=[0])
    args = p.parse_args(argv)
    overrides, results_path, results = read_sweep(args, args.name)
    overrides = {"distill.student": "mobilenet:16", "distill.method": "kd", "distill.teacher_cache": True,
                 **overrides}
    out = Path(args.out)
    teacher, teacher_sha = pin_teacher({}, out / "methods.json")  # the method benchmark's teacher
    # seed-major, so a cut-short sweep still compares configs on the same seeds
    tasks = {f"{c}/seed{s}": (f"{args.name}/{c}_seed{s}", {**overrides, **CONFIGS[c], "base.seed": s})
             for s in args.seeds for c in args.configs if f"{c}/seed{s}" not in results}
    try:
        run_all(tasks, out / "runs", args.jobs, teacher, {"teacher_sha": teacher_sha}, results, results_path,
                after=lambda: atomic_write(out / f"{args.name}.md", table(results), text=True))
    finally:
        print(table(results))


def table(results: dict) -> str:
    by_config = {c: [v for k, v in results.items() if k.split("/")[0] == c] for c in CONFIGS}
    rows = ["| config | seeds | val top-1 | test top-1 | gap to the teacher (test, points) | ECE "
            "| distill wall time (s) | teacher-cache hits |", "|" + " --- |" * 8]
    for config, runs in by_config.items():
        if not runs:
            continue
        val, test, ece, secs = (mean_std([r[m] for r in runs]) for m in ("val_top1", "top1", "ece", "train_seconds"))
        gap = mean_std([100 * (r["teacher_top1"] - r["top1"]) for r in runs])[0]
        hits = " / ".join(f"{r.get('teacher_cache_hit_fraction') or 0:.2f}" for r in runs)
        rows.append(f"| {config} | {len(runs)} | {100 * val[0]:.2f} ± {100 * val[1]:.2f} | {100 * test[0]:.2f} ± "
                    f"{100 * test[1]:.2f} | {gap:.2f} | {ece[0]:.4f} | {secs[0]:.0f} | {hits} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
