"""Fixed against spot-adaptive distillation (distill.spots) for the 11 feature methods, side by
side: default teacher (the method benchmark's pinned one) and student, default epochs, >= 2 seeds.

    python -m benchmarks.spots [--methods at nst ...] [--seeds 0 1] [--jobs 2] [-S distill.epochs=10]
    python -m benchmarks.spots --step-time [--methods ...]      # the overhead alone, in one process

Needs `dvc repro prepare` first. Writes benchmarks/results/spots.{json,md}: test top-1 (mean ± std)
of each, the difference, the training time per epoch of each and their ratio (runs side by side
share the cores, so compare within the table), and for the adaptive runs the fraction of samples
routed to the teacher at each spot in the last epoch and the grafted network's val accuracy.
Finished runs are kept in spots.json, so an interrupted benchmark resumes where it stopped.

``--step-time`` measures the overhead of routing alone: training steps (forward, backward, update) of
the fixed and the adaptive distiller on the same batches of the prepared training set, alternating
in one process (default student, the pinned teacher on onnxruntime as in a CPU run); it prints the
median step time of each and their ratio and writes benchmarks/results/spots_step_time.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks._runs import mean_std, pin_teacher, read_sweep, run_all, sweep_arguments
from kdcompress.io import atomic_write, write_json

METHODS = ["fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ft", "fsp", "nst", "crd"]
MODES = ("fixed", "adaptive")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--step-time", action="store_true", help="only the per-step overhead, in one process")
    p.add_argument("--steps", type=int, default=20, help="--step-time: timed steps per method and mode")
    sweep_arguments(p, seeds=[0, 1])
    args = p.parse_args(argv)
    overrides, results_path, results = read_sweep(args, "spots")
    out = Path(args.out)
    teacher, teacher_sha = pin_teacher({}, out / "methods.json")  # the method benchmark's teacher
    if args.step_time:
        return step_time(args.methods, teacher, args.steps, out / "spots_step_time.json")
    stale = {r.get("teacher_sha") for r in results.values()} - {teacher_sha}
    if stale:
        raise SystemExit(f"{results_path}: made with another teacher ({', '.join(map(str, stale))}); move it away")
    # seed-major, fixed and adaptive of a method next to each other: a cut-short run still has pairs
    tasks = {f"{m}/{mode}/seed{s}": (f"spots/{m}_{mode}_seed{s}",
                                     {**overrides, "distill.method": m, "distill.spots": mode, "base.seed": s})
             for s in args.seeds for m in args.methods for mode in MODES if f"{m}/{mode}/seed{s}" not in results}
    step_path = out / "spots_step_time.json"
    step = json.loads(step_path.read_text()) if step_path.exists() else None
    try:
        run_all(tasks, out / "runs", args.jobs, teacher, {"teacher_sha": teacher_sha}, results, results_path,
                after=lambda: atomic_write(out / "spots.md", table(results, step), text=True))
    finally:
        print(table(results, step))


def step_time(methods: list[str], teacher_path: Path, steps: int, out: Path) -> None:
    import torch

    from kdcompress.config import RoutingConfig, load_params
    from kdcompress.data.prepared import load_prepared
    from kdcompress.methods import build_loss
    from kdcompress.training.distiller import Distiller
    from kdcompress.training.ort_teacher import OrtTeacher
    from kdcompress.training.routing import SpotRouter
    from pipeline._common import build_model, load_model, loader

    params = load_params("params.yaml")
    cfg = params["distill"]
    data = load_prepared("artifacts/data", splits=("train",))
    meta = {"mean": data.mean, "std": data.std}
    device = torch.device("cpu")
    teacher = OrtTeacher(load_model(str(teacher_path), device, data), data.input_shape)
    batches = list(zip(range(steps + 3), loader(data.train, meta, device, cfg.batch_size).batches(
        shuffle=True, augment=True, epoch=0)))
    report = {}
    for method in methods:
        runs = {}
        for mode in ("fixed", "adaptive"):
            torch.manual_seed(0)
            loss = build_loss(method, params["methods"].get(method))
            router = SpotRouter(loss, RoutingConfig()) if mode == "adaptive" else None
            student = build_model(cfg.student, len(data.classes), data.input_shape[0])
            d = Distiller(student, teacher, loss, router=router)
            d.setup(batches[0][1][0])
            d.train()
            d.on_epoch_start(0, 1)
            optimizer = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)
            for group in d.auxiliary_param_groups():
                group["lr"] = 0.005
            runs[mode] = (d, optimizer, [])
        for i, (_, (x, y, idx)) in enumerate(batches):  # alternate, so both see the same machine state
            for mode, (d, optimizer, seconds) in runs.items():
                start = time.perf_counter()
                out_ = d(x, y)
                optimizer.zero_grad(set_to_none=True)
                out_.loss.backward()
                optimizer.step()
                if i >= 3:  # warm-up steps are not timed
                    seconds.append(time.perf_counter() - start)
        fixed, adaptive = (statistics.median(runs[m][2]) for m in ("fixed", "adaptive"))
        report[method] = {"fixed_ms": 1e3 * fixed, "adaptive_ms": 1e3 * adaptive, "ratio": adaptive / fixed}
        print(f"{method}: fixed {1e3 * fixed:.1f} ms, adaptive {1e3 * adaptive:.1f} ms per step "
              f"(batch {cfg.batch_size}): {adaptive / fixed:.2f}x", flush=True)
    write_json(out, {"student": cfg.student, "batch_size": cfg.batch_size, "steps": steps,
                     "threads": torch.get_num_threads(), "methods": report})


def table(results: dict, step_time: dict | None = None) -> str:
    """The fixed-against-adaptive table; with ``step_time`` (spots_step_time.json) a column of the
    quiet per-step ratios beside the epoch times of runs that shared the cores."""
    runs = {(m, mode): [v for k, v in results.items() if k.startswith(f"{m}/{mode}/")]
            for m in METHODS for mode in MODES}
    steps = (step_time or {}).get("methods", {})
    rows = ["| method | seeds | fixed top-1 | adaptive top-1 | Δ points | fixed s/epoch | adaptive s/epoch | ratio "
            "| step ratio | routed to the teacher, last epoch (spots …, output) | graft val acc |",
            "| --- |" + " --- |" * 10]
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
                    + (f" | {steps[m]['ratio']:.2f}x" if m in steps else " | -") + f" | {routed or '-'} | {graft} |")
    jobs = sorted({r.get("jobs", 1) for r in results.values()})
    rows += ["", f"s/epoch: training wall time per epoch with {' or '.join(map(str, jobs))} run(s) side by side "
                 "on this machine's cores; seeds: fixed/adaptive runs. step ratio: adaptive over fixed per training "
                 "step, the two alternating in one process on a quiet machine (`--step-time`)."]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
