"""The teacher trained in fp32 and under bf16 autocast, seed by seed: val and test top-1 and training time
of each, the accuracy check behind ``auto`` in teacher.precision.

    python -m benchmarks.bf16_teacher [--seeds 0 1 2] [-S base.num_threads=1] [--model resnet20]

Needs `dvc repro prepare`. Each (seed, precision) runs the train_teacher stage with base.seed and
teacher.precision set (the other params as in params.yaml, with the -S overrides) in
benchmarks/results/runs/bf16_teacher/, then top-1 of its best checkpoint on the prepared test split. Finished
runs are kept in benchmarks/results/bf16_teacher.json with the host's CPU; an interrupted run resumes. Two
precisions on a CPU without native bf16 measure torch's emulation, not bf16: the script refuses them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks._runs import mean_std, read_sweep, sweep_arguments, train_teacher
from kdcompress.common.checkpoint import load_model
from kdcompress.common.host import cpu_name, native_bf16
from kdcompress.data.loader import make_loader
from kdcompress.data.prepared import load_prepared
from kdcompress.io import atomic_write, write_json
from kdcompress.runtime import resolve_device
from kdcompress.training.loop import predict
from models import create_model

PRECISIONS = ("fp32", "bf16")


def test_top1(teacher: Path, data_dir: str = "artifacts/data") -> float:
    device = resolve_device("cpu")
    data = load_prepared(data_dir, splits=("test",))
    logits, labels = predict(load_model(teacher, device, create_model, data),
                             make_loader(data, "test", device, 1024), desc="test teacher")
    return float((logits.argmax(1) == labels).float().mean())


def table(results: dict) -> str:
    lines = ["| seed | fp32 val / test | bf16 val / test | fp32 s | bf16 s |", "|" + " --- |" * 5]
    seeds = sorted({r["seed"] for r in results.values()})
    for seed in seeds:
        r = {p: results.get(f"{p}/seed{seed}") for p in PRECISIONS}
        cells = [f"{100 * x['val_top1']:.2f} / {100 * x['test_top1']:.2f}" if x else "-" for x in r.values()]
        secs = [f"{x['train_seconds']:.0f}" if x else "-" for x in r.values()]
        lines.append(f"| {seed} | {' | '.join(cells)} | {' | '.join(secs)} |")
    for metric in ("val_top1", "test_top1"):
        stats = {p: mean_std([100 * r[metric] for k, r in results.items() if k.startswith(p + "/")])
                 for p in PRECISIONS if any(k.startswith(p + "/") for k in results)}
        lines.append(f"\n{metric}: " + ", ".join(f"{p} {m:.2f} ± {s:.2f}" for p, (m, s) in stats.items()))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    sweep_arguments(p, seeds=[0, 1, 2])
    args = p.parse_args(argv)
    if not native_bf16():
        raise SystemExit(f"{cpu_name()}: no native bf16 (AVX-512 BF16 or AMX); bf16 here would be emulated")
    overrides, results_path, results = read_sweep(args, "bf16_teacher")
    runs = Path(args.out) / "runs" / "bf16_teacher"
    for seed in args.seeds:
        for precision in PRECISIONS:
            key = f"{precision}/seed{seed}"
            if key in results:
                continue
            folder = runs / f"{precision}_seed{seed}"
            teacher = train_teacher(args.model, folder, overrides={
                **overrides, "base.seed": seed, "teacher.precision": precision})
            fit = json.loads((folder / "teacher.json").read_text())
            results[key] = {"seed": seed, "precision": precision, "model": args.model, "val_top1": fit["val_acc"],
                            "test_top1": test_top1(teacher), "train_seconds": fit["train_seconds"],
                            "best_epoch": fit["best_epoch"], "overrides": overrides, "cpu": cpu_name(),
                            "date": time.strftime("%Y-%m-%d")}
            write_json(results_path, results)
            print(table(results), flush=True)
    text = table(results)
    atomic_write(results_path.with_suffix(".md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
