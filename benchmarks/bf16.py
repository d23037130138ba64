"""Training steps in fp32 and under bf16 autocast, alternating in one process: the measurement behind
``auto`` in teacher.precision / distill.precision.

    python -m benchmarks.bf16 [--models resnet20 mobilenet:16] [--steps 30] [--rounds 5]

For each model, a training step (forward, CE, backward, SGD with momentum) on random 28-px batches of 128 runs
``--steps`` times in fp32, then as many under bf16 autocast, round after round, so both precisions see the
same machine state; prints img/s and bf16 against fp32, and the host's CPU with its bf16 flags (where the
CPU has no native bf16, torch emulates it through fp32). Appends to benchmarks/results/bf16.json, one entry
per host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kdcompress.common.host import cpu_name, native_bf16
from kdcompress.io import write_json
from kdcompress.runtime import has_depthwise
from kdcompress.training.loop import autocast
from models import create_model

OUT = Path("benchmarks/results/bf16.json")


def step_seconds(model: torch.nn.Module, precision: str, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(x.device, precision):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "mobilenet:16"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    rows = []
    for name in args.models:
        model = create_model(name, 10, 1).to(memory_format=torch.channels_last).train()
        times = {"fp32": [], "bf16": []}
        for precision in times:  # warm-up: one untimed block each
            step_seconds(model, precision, x, y, 3)
        for _ in range(args.rounds):
            for precision in times:
                times[precision].append(step_seconds(model, precision, x, y, args.steps))
        fp32, bf16 = (statistics.median(times[k]) for k in ("fp32", "bf16"))
        rows.append({"model": name, "depthwise": has_depthwise(model), "fp32_img_s": round(args.batch_size / fp32, 1),
                     "bf16_img_s": round(args.batch_size / bf16, 1), "bf16_vs_fp32": round(fp32 / bf16, 3)})
        print(f"{name}: fp32 {rows[-1]['fp32_img_s']} img/s, bf16 {rows[-1]['bf16_img_s']} img/s, "
              f"bf16 {rows[-1]['bf16_vs_fp32']}x", flush=True)
    host = cpu_name()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results[host] = {"native_bf16": native_bf16(), "threads": torch.get_num_threads(), "batch": args.batch_size,
                     "steps": args.steps, "rounds": args.rounds, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    write_json(OUT, results)
    print(f"host: {host} (native bf16: {native_bf16()}) -> {OUT}")


if __name__ == "__main__":
    main()
