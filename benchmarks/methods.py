"""Every KD method on the default pipeline settings (same teacher, epochs; the TinyCNN student of the
committed table unless -S distill.student=... says otherwise), >= 2 seeds.

    python -m benchmarks.methods [--methods kd dkd ...] [--seeds 0 1] [--jobs 2] [-S distill.epochs=5]

Needs `dvc repro` first (prepared data + teacher). Writes benchmarks/results/methods.{json,md}:
test accuracy, ECE, agreement, training time per epoch (mean ± std over seeds) and the seed
notebook's rank table (ranks per metric, average rank). Finished runs are kept in methods.json
and the teacher they used in methods_teacher.pt (commit both), so an interrupted benchmark
resumes where it stopped, also on another machine, where `dvc repro prepare` is then enough.
``--jobs N`` runs N students side by side, each with cores/N threads: on a small CPU that gets
more done per hour than one run on all cores (the per-epoch times are then those of a run
sharing the machine; compare them within one table).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._runs import mean_std, pin_teacher, read_sweep, run_all, sweep_arguments
from kdcompress.io import atomic_write
from kdcompress.methods import LOSSES
from kdcompress.report.leaderboard import RANKED
from kdcompress.report.metrics import rank_table

SHOWN = ["val_top1", "top1", "ece", "nll", "agreement", "kl_teacher_student", "logit_cosine", "entropy",
         "epoch_seconds"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(LOSSES))
    p.add_argument("--name", default="methods", help="the results file <out>/<name>.json; another name (e.g. "
                   "methods_rerun) starts a new table on the committed table's teacher (methods_teacher.pt)")
    sweep_arguments(p, seeds=[0, 1])
    args = p.parse_args(argv)
    overrides, results_path, results = read_sweep(args, args.name)
    overrides.setdefault("distill.student", "tinycnn")  # the student of the committed table
    out = Path(args.out)
    teacher, teacher_sha = pin_teacher(results, results_path, None if args.name == "methods"
                                       else lambda: out / "methods_teacher.pt")
    table_path = out / "methods.json"  # the committed table, which a rerun is compared with
    # a rerun of the committed table's student is compared with it; another student's table is not
    compare = args.name != "methods" and overrides["distill.student"] == "tinycnn" and table_path.exists()
    committed = json.loads(table_path.read_text()) if compare else {}
    todo = plan(results, args.methods, args.seeds, timing=committed)
    tasks = {f"{m}/seed{s}": (f"{args.name}/{m}_seed{s}", {**overrides, "distill.method": m, "base.seed": s})
             for m, s in todo}

    def report() -> str:
        return table(results, args.methods) + (against(results, committed) if committed else "")

    try:
        run_all(tasks, out / "runs", args.jobs, teacher, {"teacher_sha": teacher_sha}, results, results_path,
                after=lambda: atomic_write(out / f"{args.name}.md", report(), text=True))
    finally:
        print(report())


def plan(results: dict, methods: list[str], seeds: list[int], timing: dict | None = None) -> list[tuple[str, int]]:
    """The (method, seed) runs still to do, seed-major, so that a partial benchmark covers every method once;
    within a seed the methods that took longest on another seed (or in ``timing``, other results) go first,
    so that side-by-side jobs end together instead of one long run finishing alone on one core."""
    seconds = {key.split("/")[0]: run["train_seconds"] for key, run in {**(timing or {}), **results}.items()}
    todo = [(m, s) for s in seeds for m in methods if f"{m}/seed{s}" not in results]
    return sorted(todo, key=lambda ms: (seeds.index(ms[1]), -seconds.get(ms[0], 0.0)))


def against(results: dict, committed: dict) -> str:
    """Each method's runs against the committed table's runs of the same (method, seed): training
    time, test top-1 and the fraction of teacher outputs read from the cache."""
    rows = ["", "Against the same runs in methods.json:", "",
            "| method | runs | train s, methods.json | train s, now | ratio | top-1, methods.json | top-1, now "
            "| teacher-cache hits |", "|" + " --- |" * 8]
    totals = [0.0, 0.0]
    for method in dict.fromkeys(k.split("/")[0] for k in results):
        keys = [k for k in results if k.split("/")[0] == method and k in committed]
        if not keys:
            continue
        before, now = (sum(runs[k]["train_seconds"] for k in keys) for runs in (committed, results))
        totals = [totals[0] + before, totals[1] + now]
        top1 = [100 * mean_std([runs[k]["top1"] for k in keys])[0] for runs in (committed, results)]
        hits = [results[k].get("teacher_cache_hit_fraction") for k in keys]
        rows.append(f"| {method} | {len(keys)} | {before:.0f} | {now:.0f} | {now / before:.2f}x | {top1[0]:.2f} | "
                    f"{top1[1]:.2f} | {' / '.join('-' if h is None else f'{h:.2f}' for h in hits)} |")
    if totals[0]:
        rows.append(f"| all | | {totals[0]:.0f} | {totals[1]:.0f} | {totals[1] / totals[0]:.2f}x | | | |")
    return "\n".join(rows) + "\n"


def table(results: dict, methods: list[str]) -> str:
    rows, means = [], {}
    shown = [m for m in SHOWN if all(m in r for r in results.values())]  # older tables lack val_top1
    header = "| method | seeds | " + " | ".join(shown) + " |"
    rows += [header, "|" + " --- |" * (len(shown) + 2)]
    for method in methods:
        runs = [v for k, v in results.items() if k.split("/")[0] == method]
        if not runs:
            continue
        stats = {m: mean_std([r[m] for r in runs]) for m in shown}
        means[method] = {m: s[0] for m, s in stats.items()}
        cells = [f"{s[0]:.1f}" if m == "epoch_seconds" else f"{s[0]:.4f} ± {s[1]:.4f}" if len(runs) > 1
                 else f"{s[0]:.4f}" for m, s in stats.items()]  # one seed: no spread to show
        rows.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    jobs = sorted({r.get("jobs", 1) for r in results.values()})
    hours = sum(r["train_seconds"] for r in results.values()) / 3600
    rows += ["", f"epoch_seconds: wall time per training epoch with {' or '.join(map(str, jobs))} run(s) side by side "
                 f"on this machine's cores. All {len(results)} runs trained for {hours:.2f} h in all (the sum of "
                 "their wall times)."]
    ranks = rank_table(means, RANKED)
    rank_cols = [f"{m}_rank" for m in RANKED]
    rows += ["", "| method | " + " | ".join(rank_cols) + " | avg_rank |", "|" + " --- |" * (len(rank_cols) + 2)]
    for method in sorted(ranks, key=lambda m: ranks[m]["avg_rank"]):
        r = ranks[method]
        rows.append(f"| {method} | " + " | ".join(str(r[c]) for c in rank_cols) + f" | {r['avg_rank']:.2f} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
