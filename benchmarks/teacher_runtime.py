"""The frozen teacher's forward pass, PyTorch eager vs onnxruntime, in one process.

    python -m benchmarks.teacher_runtime [--batches 60] [--batch-size 128] [--threads 0]

Needs `dvc repro` first (prepared data + teacher). Times ``extract`` (logits, embedding and every
stage output, what distillation uses) on real training batches, alternating the two runtimes
round by round so both see the same machine state, and prints ms per batch, the ratio, and what
one distillation epoch spends in the teacher with each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._runs import TEACHER
from kdcompress.data.prepared import load_prepared
from kdcompress.training.ort_teacher import OrtTeacher
from pipeline._common import load_model, loader


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="0 = torch's default (all cores)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    data = load_prepared("artifacts/data", splits=("train",))
    batches = [x for x, _, _ in loader(data.train, {"mean": data.mean, "std": data.std}, cpu, args.batch_size,
                                       crop_padding=2, hflip=True, seed=0).batches()][:args.batches]
    torch_teacher = load_model(TEACHER, cpu)
    ort_teacher = OrtTeacher(load_model(TEACHER, cpu), data.input_shape)  # its own copy: export changes the layout
    runtimes = {"torch": torch_teacher.extract, "onnxruntime": ort_teacher.extract}
    seconds = {name: [] for name in runtimes}
    with torch.no_grad():
        for name, extract in runtimes.items():  # warm-up
            for x in batches[:5]:
                extract(x)
        for _ in range(args.rounds):
            for name, extract in runtimes.items():
                start = time.perf_counter()
                for x in batches:
                    extract(x)
                seconds[name].append((time.perf_counter() - start) / len(batches))
    ms = {name: 1e3 * statistics.median(s) for name, s in seconds.items()}
    steps = -(-len(data.train) // args.batch_size)
    print(f"teacher extract, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds x {len(batches)} batches:")
    for name, value in ms.items():
        print(f"  {name:12s} {value:7.2f} ms/batch  ({value * steps / 1e3:5.1f} s per epoch of {len(data.train)})")
    print(f"  onnxruntime speed-up: {ms['torch'] / ms['onnxruntime']:.2f}x")


if __name__ == "__main__":
    main()
