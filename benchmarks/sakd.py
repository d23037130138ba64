"""Full-data KD vs SAKD(r=0.5, I=5)+KD vs SAKD(r=0.5, I=1)+KD, side by side, >= 3 seeds.

    python -m benchmarks.sakd [--seeds 0 1 2] [--method kd] [-S distill.epochs=10]

Needs `dvc repro` first (prepared data + teacher). Prints and writes
benchmarks/results/sakd_<method>.{json,md}: test accuracy (mean ± std), ECE, total distill wall
time and its ratio to full-data KD, and the selection round's time as a fraction of one
full-data epoch. Wall time counts the difficulty passes and the DPP selections.
"""

from __future__ import annotations

import argparse
from pathlib import Path


from benchmarks._runs import mean_std, read_sweep, run_student
from kdcompress.io import atomic_write, write_json

CONFIGS = {
    "full": {"distill.sampling": "full"},
    "sakd_r0.5_I5": {"distill.sampling": "sakd", "sakd.ratio": 0.5, "sakd.interval": 5},
    "sakd_r0.5_I1": {"distill.sampling": "sakd", "sakd.ratio": 0.5, "sakd.interval": 1},
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--method", default="kd")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("-S", dest="overrides", action="append", default=[], help="key=value, as for dvc exp run -S")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    overrides, results_path, results = read_sweep(args, f"sakd_{args.method}")
    overrides.setdefault("distill.student", "tinycnn")  # the student of the committed tables
    out = Path(args.out)
    for seed in args.seeds:  # seed-major, so a cut-short run still compares configs on the same seeds
        for config in args.configs:
            key = f"{config}/seed{seed}"
            if key not in results:
                results[key] = run_student(f"sakd_{args.method}/{config}_seed{seed}", out / "runs",
                                           {**overrides, **CONFIGS[config], "distill.method": args.method,
                                            "base.seed": seed})
                write_json(results_path, results)
    atomic_write(out / f"sakd_{args.method}.md", table(results, args.method), text=True)
    print((out / f"sakd_{args.method}.md").read_text())


def table(results: dict, method: str) -> str:
    by_config = {c: [v for k, v in results.items() if k.split("/")[0] == c] for c in CONFIGS}
    full = by_config["full"]
    full_time = mean_std([r["train_seconds"] for r in full])[0] if full else float("nan")
    full_epoch = mean_std([r["epoch_seconds"] for r in full])[0] if full else float("nan")
    rows = [f"KD method: {method}", "",
            "| config | seeds | test top-1 | ECE | distill wall time (s) | time / full KD | round / full epoch |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for config, runs in by_config.items():
        if not runs:
            continue
        acc, ece, secs = (mean_std([r[m] for r in runs]) for m in ("top1", "ece", "train_seconds"))
        rnd = mean_std([r["round_seconds"] for r in runs])[0]
        rows.append(f"| {config} | {len(runs)} | {100 * acc[0]:.2f} ± {100 * acc[1]:.2f} | {ece[0]:.4f} | "
                    f"{secs[0]:.0f} ± {secs[1]:.0f} | {secs[0] / full_time:.2f}x | "
                    + (f"{rnd / full_epoch:.2f} |" if rnd else "- |"))
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
