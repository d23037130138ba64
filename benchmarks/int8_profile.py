"""Where the time of an int8 model goes: onnxruntime's profiler (``SessionOptions.enable_profiling``) per
op type, fp32 against int8 in the project's single configuration (naive: every op type onnxruntime
quantizes) and in the fastest configuration of the quantize stage's search list, at batch 1 on one thread.

    nice -n 10 python -m benchmarks.int8_profile [--models mobilenet:16@28 tv:resnet18@224 ...] [--runs 200]

Latency only: the weights are random (torchvision's initialisation, nothing is downloaded) and the
calibration images random normal, so no accuracy is measured (the quantize stage's search gates every
candidate on val) and only the configurations with per-channel weights and no ``reduce_range`` are
timed (the weight options change accuracy, not the kernels run). The host is shared: only ratios
measured side by side in one process compare (``time_models`` interleaves the models' blocks of runs).
Writes ``--out`` (JSON) and prints the markdown tables of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from kdcompress.common.host import cpu_name
from kdcompress.common.int8 import Quantizer
from kdcompress.common.onnx import INPUT_NAME, save_onnx, to_onnx
from kdcompress.deploy.int8_search import candidates, depthwise_convs, with_activations, write_candidates
from kdcompress.deploy.profiling import block_runs, count_macs, time_models
from kdcompress.io import write_json
from models import create_model

MODELS = ["mobilenet:16@28", "tv:mobilenet_v3_small@224", "tv:efficientnet_b0@224", "tv:resnet18@224",
          "tv:shufflenet_v2_x1_0@224", "tv:mobilenet_v3_large@224"]
TOP = 5  # op types listed per model and precision


def op_profiles(paths: dict[str, Path], shape: list[int], runs: int, rounds: int, depthwise: set[str],
                warmup: int = 5) -> dict:
    """Kernel ms per run of each op type of the optimised graphs onnxruntime runs (the session options
    of kdcompress.common.onnx.session: one thread, sequential, all graph optimisations), by label of
    ``paths``: the median over ``rounds`` x ``runs`` runs, the models interleaved round by round, op types
    largest first; the kernels of the ``depthwise`` convolutions apart (``depthwise``: the names of their
    nodes and output tensors, which onnxruntime's fused nodes are named after). The profiler's own
    cost per node inflates the figures of a tiny model: compare shares and ratios, not totals, with p50."""
    x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="kdcompress-profile-") as tmp:
        sessions = {}
        for label, path in paths.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.enable_profiling, opts.profile_file_prefix = True, f"{tmp}/{label}"
            sessions[label] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for sess in sessions.values():
            for _ in range(warmup):
                sess.run(None, {INPUT_NAME: x})
        for _ in range(rounds):
            for sess in sessions.values():
                for _ in range(runs):
                    sess.run(None, {INPUT_NAME: x})
        return {label: _per_op(json.loads(Path(sess.end_profiling()).read_text()), warmup, depthwise)
                for label, sess in sessions.items()}


def _per_op(events: list[dict], warmup: int, depthwise: set[str]) -> dict[str, float]:
    """Median ms per run of each op type's kernels, from one session's profile, the first ``warmup`` runs
    left out; an optimised node named after a ``depthwise`` name counts as ``<op> (dw)``."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    per_run = defaultdict(lambda: np.zeros(len(starts)))
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"].removesuffix("_kernel_time")
            op = e["args"]["op_name"]
            if "Conv" in op and any(node == name or node.startswith(f"{name}_") for name in depthwise):
                op += " (dw)"
            per_run[op][bisect.bisect_right(starts, e["ts"]) - 1] += e["dur"] / 1e3
    ms = {op: float(np.median(times[warmup:])) for op, times in per_run.items()}
    return dict(sorted(ms.items(), key=lambda item: -item[1]))


def measure(spec: str, runs: int, rounds: int, folder: Path) -> dict:
    """fp32 and the search list's latency configurations of model ``name@px`` (random weights): p50 of
    each, interleaved, and the per-op profile of fp32, the naive int8 and the fastest int8."""
    name, px = spec.rsplit("@", 1)
    channels = 3 if name.startswith("tv:") else 1  # the project's own nets as on Fashion-MNIST
    shape = [channels, int(px), int(px)]
    torch.manual_seed(0)
    model = create_model(name, 10, channels).eval()
    fp32 = save_onnx(to_onnx(model, shape, 18, {}), folder / "fp32.onnx")
    rng = np.random.default_rng(0)
    quantizer = Quantizer(fp32, [rng.standard_normal((4, *shape), dtype=np.float32) for _ in range(4)], "minmax",
                          folder)
    configs = [c for c in candidates(quantizer.graph, per_channel=True) if c.per_channel and not c.reduce_range]
    files, timed_as, dropped = write_candidates(quantizer, configs, folder)
    block = block_runs(fp32, shape, runs, rounds)
    p50 = time_models({name: ({"fp32": fp32} | files)[name] for name in ("fp32", *timed_as.values())}, shape, block,
                      rounds)
    best = min(set(timed_as.values()), key=p50.get)
    dw = set(with_activations(quantizer.graph, depthwise_convs(quantizer.graph)))
    ids = dw | {o for n in quantizer.graph.graph.node if n.name in dw for o in n.output}  # fused nodes take these
    ops = op_profiles({"fp32": fp32, "naive": files["all"], "best": files[best]}, shape, block, rounds, ids)
    return {"model": spec, "macs": count_macs(model, shape), "p50_ms": p50, "best": best, "timed_as": timed_as,
            "dropped": dropped, "ops": ops}


def tables(results: list[dict]) -> str:
    """The markdown of benchmarks/README.md: latencies, then where the time goes."""
    lines = ["| model | MMACs | fp32 ms | naive int8 ms (x fp32) | best int8 ms (x fp32) | best configuration |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        fp32, naive, best = (r["p50_ms"][k] for k in ("fp32", "all", r["best"]))
        lines.append(f"| `{r['model']}` | {r['macs'] / 1e6:.1f} | {fp32:.3f} | {naive:.3f} ({fp32 / naive:.2f}x) | "
                     f"{best:.3f} ({fp32 / best:.2f}x) | `{r['best']}` |")
    lines += ["", "| model | precision | profiled ms | top op types (ms per run) |", "| --- | --- | --- | --- |"]
    for r in results:
        for label, ops in r["ops"].items():
            top = ", ".join(f"{op} {ms:.3f}" for op, ms in list(ops.items())[:TOP])
            lines.append(f"| `{r['model']}` | {label if label != 'best' else r['best']} | {sum(ops.values()):.3f} | "
                         f"{top} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="registry name @ image size")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs per model (and per profile), at least")
    p.add_argument("--rounds", type=int, default=20, help="interleaved blocks the runs come in")
    p.add_argument("--out", default="benchmarks/results/int8_profile.json")
    args = p.parse_args(argv)
    results = []
    for spec in args.models:
        start = time.process_time()
        with tempfile.TemporaryDirectory(prefix="kdcompress-int8-profile-") as tmp:
            results.append(measure(spec, args.runs, args.rounds, Path(tmp)))
        print(f"{spec}: fp32 {results[-1]['p50_ms']['fp32']:.3f} ms, best {results[-1]['best']} "
              f"({time.process_time() - start:.0f} s CPU)", flush=True)
    write_json(args.out, {"host": cpu_name(), "onnxruntime": ort.__version__, "threads": 1, "batch": 1,
                          "date": datetime.date.today().isoformat(), "runs": args.runs, "rounds": args.rounds,
                          "results": results})
    print(tables(results))


if __name__ == "__main__":
    main()
