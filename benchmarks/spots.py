"""Fixed against spot-adaptive distillation (distill.spots) for the 11 feature methods, side by
side: default teacher (the method benchmark's pinned one) and student, default epochs, >= 2 seeds.

    python -m benchmarks.spots [--methods at nst ...] [--seeds 0 1] [--jobs 2] [-S distill.epochs=10]

Needs `dvc repro prepare` first. Writes benchmarks/results/spots.{json,md}: test top-1 (mean ± std)
of each, the difference, the training time per epoch of each and their ratio (runs side by side
share the cores, so compare within the table), and for the adaptive runs the fraction of samples
routed to the teacher at each spot in the last epoch and the grafted network's val accuracy.
Finished runs are kept in spots.json, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._runs import mean_std, pin_teacher, read_sweep, run_all, sweep_arguments
from kdcompress.io import atomic_write

METHODS = ["fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ft", "fsp", "nst", "crd"]
MODES = ("fixed", "adaptive")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    sweep_arguments(p, seeds=[0, 1])
    args = p.parse_args(argv)
    overrides, results_path, results = read_sweep(args, "spots")
    out = Path(args.out)
    teacher, teacher_sha = pin_teacher({}, out / "methods.json")  # the method benchmark's teacher
    stale = {r.get("teacher_sha") for r in results.values()} - {teacher_sha}
    if stale:
        raise SystemExit(f"{results_path}: made with another teacher ({', '.join(map(str, stale))}); move it away")
    # seed-major, fixed and adaptive of a method next to each other: a cut-short run still has pairs
    tasks = {f"{m}/{mode}/seed{s}": (f"spots/{m}_{mode}_seed{s}",
                                     {**overrides, "distill.method": m, "distill.spots": mode, "base.seed": s})
             for s in args.seeds for m in args.methods for mode in MODES if f"{m}/{mode}/seed{s}" not in results}
    try:
        run_all(tasks, out / "runs", args.jobs, teacher, {"teacher_sha": teacher_sha}, results, results_path,
                after=lambda: atomic_write(out / "spots.md", table(results), text=True))
    finally:
        print(table(results))


def table(results: dict) -> str:
    runs = {(m, mode): [v for k, v in results.items() if k.startswith(f"{m}/{mode}/")]
            for m in METHODS for mode in MODES}
    rows = ["| method | seeds | fixed top-1 | adaptive top-1 | Δ points | fixed s/epoch | adaptive s/epoch | ratio "
            "| routed to the teacher, last epoch (spots …, output) | graft val acc |",
            "| --- |" + " --- |" * 9]
    for m in METHODS:
        fixed, adaptive = runs[(m, "fixed")], runs[(m, "adaptive")]
        if not fixed and not adaptive:
            continue
        pairs = (("fixed", fixed), ("adaptive", adaptive))
        acc = {mode: mean_std([r["top1"] for r in rs]) if rs else None for mode, rs in pairs}
        sec = {mode: mean_std([r["epoch_seconds"] for r in rs])[0] if rs else None for mode, rs in pairs}
        last = [r["routing"][-1] for r in adaptive if r.get("routing")]
        spots = [k for k in (last[0] if last else {}) if k.startswith("routed_")]
        routed = ", ".join(f"{k.removeprefix('routed_')} {mean_std([r[k] for r in last])[0]:.2f}" for k in spots)
        graft = f"{100 * mean_std([r['graft_val_acc'] for r in last])[0]:.2f}" if last else "-"

        def cell(a):
            return f"{100 * a[0]:.2f} ± {100 * a[1]:.2f}" if a else "-"

        both = acc["fixed"] and acc["adaptive"]
        rows.append(f"| {m} | {len(fixed)}/{len(adaptive)} | {cell(acc['fixed'])} | {cell(acc['adaptive'])} | "
                    + (f"{100 * (acc['adaptive'][0] - acc['fixed'][0]):+.2f}" if both else "-") + " | "
                    + " | ".join(f"{s:.0f}" if s else "-" for s in sec.values()) + " | "
                    + (f"{sec['adaptive'] / sec['fixed']:.2f}x" if sec["fixed"] and sec["adaptive"] else "-")
                    + f" | {routed or '-'} | {graft} |")
    jobs = sorted({r.get("jobs", 1) for r in results.values()})
    rows += ["", f"s/epoch: training wall time per epoch with {' or '.join(map(str, jobs))} run(s) side by side "
                 "on this machine's cores; seeds: fixed/adaptive runs."]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
