"""Full-data KD vs SAKD(r=0.5)+KD variants and a random subset, side by side, >= 3 seeds, on the
method benchmark's pinned teacher, without the teacher cache (every run pays its teacher forwards: a
fair wall time; ``-S distill.teacher_cache=true`` measures the cached product instead).

    python -m benchmarks.sakd [--seeds 0 1 2] [--method kd] [--jobs 2] [-S distill.epochs=10]
    python -m benchmarks.sakd --pair resnet56:resnet20 --configs full sakd_r0.5_I5 [...]
    python -m benchmarks.sakd --name sakd_kd_30ep -S distill.epochs=30 --configs full full_half_epochs [...]

Configs: I=5 and I=1 (rounds every 5 epochs / every epoch), I=5 with the difficulty pass on the
teacher's int8 twin, I=1 with beta instead of beta_raw as the rate of the alpha update (the two
differ only in rounds where beta_raw > eta, which I=5 over 10 epochs never reaches), I=5 with
rate 1 (alpha follows s_hat without the interruption factor), I=5 with sakd.loss_scale: constant
(each batch's weights total the base method's), with sakd.normalise: rank, and with both; a uniform
random subset of r = 0.5 redrawn every 5 epochs with the plain KD loss (distill.sampling: random, the
control at SAKD's optimizer steps); and full-data KD over half the epochs (full_5_epochs; at any
distill.epochs, full_half_epochs), which takes as many optimizer steps as r = 0.5 (what fewer steps
alone cost). ``--name``: another results file (another schedule or student) on the same teacher. Needs
`dvc repro prepare` first. ``--pair T:S`` runs another teacher/student pair (the paper's shape,
ResNet-56 -> ResNet-20): a T teacher is trained once with the train_teacher stage and pinned as
sakd_<method>_<T>_<S>_teacher.pt. Prints and writes benchmarks/results/sakd_<method>[_T_S].{json,md}: test
accuracy (mean ± std), ECE, distill wall time and its ratio to full-data KD, the selection round's
time as a fraction of one full-data epoch and its split (teacher, student, DPP), and the mean alpha
of the selected samples per round. Wall time counts the difficulty passes and the DPP selections.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks._runs import mean_std, pin_teacher, read_sweep, run_all, sweep_arguments, train_teacher
from kdcompress.config import load_params
from kdcompress.io import atomic_write

HALF = "half"  # distill.epochs: half the sweep's, as many optimizer steps as r = 0.5 over all of them
SAKD = {"distill.sampling": "sakd", "sakd.ratio": 0.5, "sakd.interval": 5,  # the paper's loss and normalisation
        "sakd.loss_scale": "paper", "sakd.normalise": "minmax"}
CONFIGS = {
    "full": {"distill.sampling": "full"},
    "full_5_epochs": {"distill.sampling": "full", "distill.epochs": 5},  # as many steps as r = 0.5 over 10
    "full_half_epochs": {"distill.sampling": "full", "distill.epochs": HALF},
    "random_r0.5_I5": {"distill.sampling": "random", "sakd.ratio": 0.5, "sakd.interval": 5},
    "sakd_r0.5_I5": SAKD,
    "sakd_r0.5_I5_int8pass": {**SAKD, "sakd.pass_teacher": "int8"},
    "sakd_r0.5_I1": {**SAKD, "sakd.interval": 1},
    "sakd_r0.5_I1_rate_beta": {**SAKD, "sakd.interval": 1, "sakd.alpha_rate": "beta"},
    "sakd_r0.5_I5_rate_one": {**SAKD, "sakd.alpha_rate": "one"},
    "sakd_r0.5_I5_constant": {**SAKD, "sakd.loss_scale": "constant"},
    "sakd_r0.5_I5_rank": {**SAKD, "sakd.normalise": "rank"},
    "sakd_r0.5_I5_constant_rank": {**SAKD, "sakd.loss_scale": "constant", "sakd.normalise": "rank"},
}


def config_overrides(config: str, epochs: int) -> dict:
    """The overrides of ``config`` in a sweep of ``epochs`` epochs (``HALF`` made a number)."""
    return {k: max(1, round(epochs / 2)) if v == HALF else v for k, v in CONFIGS[config].items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="kd")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--pair", metavar="TEACHER:STUDENT", type=pair,
                   help="another pair, e.g. resnet56:resnet20: its own table and a teacher trained for it (once)")
    p.add_argument("--name", help="the results file <out>/<name>.json (default: sakd_<method>[_T_S]); another "
                   "name starts another table (another schedule or student) on the same teacher")
    sweep_arguments(p, seeds=[0, 1, 2])
    args = p.parse_args(argv)
    name = args.name or f"sakd_{args.method}" + (f"_{args.pair[0]}_{args.pair[1]}" if args.pair else "")
    overrides, results_path, results = read_sweep(args, name)
    overrides.setdefault("distill.student", args.pair[1] if args.pair else "tinycnn")  # that of the committed table
    overrides.setdefault("distill.teacher_cache", False)  # every run pays for its own teacher forwards
    epochs = int(overrides.get("distill.epochs", load_params("params.yaml")["distill"].epochs))
    out = Path(args.out)
    if args.pair:  # the pair's teacher, trained when its table starts and pinned beside it
        teacher, teacher_sha = pin_teacher(results, results_path,
                                           lambda: train_teacher(args.pair[0], out / "runs" / name / "teacher"))
    else:
        teacher, teacher_sha = pin_teacher({}, out / "methods.json")  # the method benchmark's teacher
    stale = {r.get("teacher_sha") for r in results.values()} - {teacher_sha}
    if stale:
        raise SystemExit(f"{results_path}: made with another teacher ({', '.join(map(str, stale))}); move it away")
    # seed-major, so a cut-short run still compares configs on the same seeds
    tasks = {f"{c}/seed{s}": (f"{name}/{c}_seed{s}",
                              {**overrides, **config_overrides(c, epochs), "distill.method": args.method,
                               "base.seed": s})
             for s in args.seeds for c in args.configs if f"{c}/seed{s}" not in results}
    try:
        run_all(tasks, out / "runs", args.jobs, teacher, {"teacher_sha": teacher_sha}, results, results_path,
                after=lambda: atomic_write(out / f"{name}.md", table(results, args.method), text=True))
    finally:
        print(table(results, args.method))


def pair(text: str) -> tuple[str, str]:
    """``TEACHER:STUDENT`` model names (registry names without arguments), for --pair."""
    from models import MODELS

    names = tuple(text.split(":"))
    if len(names) != 2 or not all(n in MODELS and n != "tv" for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected TEACHER:STUDENT, two of "
                                         f"{', '.join(sorted(set(MODELS) - {'tv'}))}")
    return names

def table(results: dict, method: str) -> str:
    by_config = {c: [v for k, v in results.items() if k.split("/")[0] == c] for c in CONFIGS}
    full = by_config["full"]
    full_time = mean_std([r["train_seconds"] for r in full])[0] if full else float("nan")
    full_epoch = mean_std([r["epoch_seconds"] for r in full])[0] if full else float("nan")
    rows = [f"KD method: {method}", "",
            "| config | seeds | test top-1 | ECE | distill wall time (s) | time / full KD | round / full epoch "
            "| round split: teacher / student / DPP (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    round_epochs = sorted({int(d["epoch"]) for runs in by_config.values() for r in runs
                           for d in r.get("round_detail", []) if "alpha_selected_mean" in d})
    curves = ["", "Mean alpha of the selected samples per round (mean over seeds; round at epoch):", "",
              "| config | " + " | ".join(f"epoch {e}" for e in round_epochs) + " |",
              "| --- |" + " --- |" * len(round_epochs)]
    for config, runs in by_config.items():
        if not runs:
            continue
        acc, ece, secs = (mean_std([r[m] for r in runs]) for m in ("top1", "ece", "train_seconds"))
        rnd = mean_std([r["round_seconds"] for r in runs])[0]
        details = [d for r in runs for d in r.get("round_detail", [])]
        split = " / ".join(f"{mean_std([d.get(k, 0.0) for d in details])[0]:.1f}"
                           for k in ("teacher_seconds", "student_seconds", "dpp_seconds")) if details else "-"
        rows.append(f"| {config} | {len(runs)} | {100 * acc[0]:.2f} ± {100 * acc[1]:.2f} | {ece[0]:.4f} | "
                    f"{secs[0]:.0f} ± {secs[1]:.0f} | {secs[0] / full_time:.2f}x | "
                    + (f"{rnd / full_epoch:.2f} | {split} |" if rnd else "- | - |"))
        if details:
            by_epoch = {e: [d["alpha_selected_mean"] for d in details if int(d["epoch"]) == e and
                            "alpha_selected_mean" in d] for e in round_epochs}
            curves.append(f"| {config} | " + " | ".join(f"{mean_std(v)[0]:.3f}" if v else "" for v in by_epoch.values())
                          + " |")
    return "\n".join(rows + (curves if len(curves) > 5 else [])) + "\n"

if __name__ == "__main__":
    main()
