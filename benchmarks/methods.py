"""Every KD method on the default pipeline settings (same teacher, student, epochs), >= 2 seeds.

    python -m benchmarks.methods [--methods kd dkd ...] [--seeds 0 1] [-S distill.epochs=5]

Needs `dvc repro` first (prepared data + teacher). Writes benchmarks/results/methods.{json,md}:
test accuracy, ECE, agreement, training time per epoch (mean ± std over seeds) and the seed
notebook's rank table (ranks per metric, average rank).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from benchmarks._runs import mean_std, run_student
from kdcompress.io import atomic_write, write_json
from kdcompress.losses import LOSSES
from kdcompress.metrics import rank_table

RANKED = {"top1": "max", "nll": "min", "ece": "min", "agreement": "max", "kl_teacher_student": "min",
          "logit_cosine": "max", "entropy": "min"}
SHOWN = ["top1", "ece", "nll", "agreement", "kl_teacher_student", "logit_cosine", "entropy", "epoch_seconds"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(LOSSES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("-S", dest="overrides", action="append", default=[], help="key=value, as for dvc exp run -S")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    out = Path(args.out)
    results_path = out / "methods.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for method in args.methods:
        for seed in args.seeds:
            key = f"{method}/seed{seed}"
            if key in results:
                continue  # resumable: finished runs are kept
            results[key] = run_student(f"methods/{method}_seed{seed}", out / "runs",
                                       {**overrides, "distill.method": method, "base.seed": seed})
            write_json(results_path, results)
    atomic_write(out / "methods.md", table(results, args.methods), text=True)
    print((out / "methods.md").read_text())


def table(results: dict, methods: list[str]) -> str:
    rows, means = [], {}
    header = "| method | seeds | " + " | ".join(SHOWN) + " |"
    rows += [header, "|" + " --- |" * (len(SHOWN) + 2)]
    for method in methods:
        runs = [v for k, v in results.items() if k.split("/")[0] == method]
        if not runs:
            continue
        stats = {m: mean_std([r[m] for r in runs]) for m in SHOWN}
        means[method] = {m: s[0] for m, s in stats.items()}
        cells = [f"{s[0]:.4f} ± {s[1]:.4f}" if m != "epoch_seconds" else f"{s[0]:.1f}" for m, s in stats.items()]
        rows.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    ranks = rank_table(means, RANKED)
    rank_cols = [f"{m}_rank" for m in RANKED]
    rows += ["", "| method | " + " | ".join(rank_cols) + " | avg_rank |", "|" + " --- |" * (len(rank_cols) + 2)]
    for method in sorted(ranks, key=lambda m: ranks[m]["avg_rank"]):
        r = ranks[method]
        rows.append(f"| {method} | " + " | ".join(str(r[c]) for c in rank_cols) + f" | {r['avg_rank']:.2f} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
