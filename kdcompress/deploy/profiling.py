"""Latency, throughput and size of a model, on onnxruntime and on PyTorch eager."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from kdcompress.common.host import cpu_name
from kdcompress.common.int8 import int8_path
from kdcompress.common.onnx import INPUT_NAME, METADATA_KEYS, read_metadata, session

BLOCK_MS = 5.0  # model time of one timing block, at least


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "runs": len(ms)}


def _time_calls(call, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def ort_latency(path: str | Path, input_shape: list[int], batch: int = 1, threads: int = 1, warmup: int = 50,
                runs: int = 300) -> dict[str, float]:
    """Edge profile: ``batch`` images per call, ``threads`` intra-op threads, sequential execution."""
    sess = session(path, threads=threads)
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    return _percentiles(_time_calls(lambda: sess.run(None, {INPUT_NAME: x}), warmup, runs))


def block_runs(path: Path, input_shape: list[int], runs: int, rounds: int) -> int:
    """Timed runs per block for ``interleaved_runs``: ``runs`` spread over ``rounds`` blocks, and at least
    ``BLOCK_MS`` of the model ``path`` (a short ``ort_latency`` probe), so that a 0.02-ms model's block
    outlasts the timer's and the scheduler's granularity."""
    probe = ort_latency(path, input_shape, 1, 1, 5, 20)["p50_ms"]
    return max(math.ceil(runs / rounds), math.ceil(BLOCK_MS / probe))


def interleaved_runs(paths: dict, input_shape: list[int], blocks: dict, rounds: int, warmup: int = 2) -> dict:
    """Batch-1, one-thread run times (seconds) of each model on ``ort_latency``'s edge profile (the same
    session options and input): ``rounds`` rounds in which each model in turn gets a fresh session,
    ``warmup`` untimed runs and ``blocks[name]`` timed ones. On a shared host
    two effects exceed the 5 % rule unless they fall on all models alike, as they do here: busy spells
    lasting seconds and a session's memory placement (on the 2-core machine under load one file measured 35
    to 59 us from one ``ort_latency`` call to the next, and one session of a 0.03-ms model ran 40 % slower
    than another)."""
    x = {INPUT_NAME: np.random.default_rng(0).standard_normal((1, *input_shape), dtype=np.float32)}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            sess = session(path, threads=1)
            for i in range(warmup + blocks[name]):
                start = time.perf_counter()
                sess.run(None, x)
                if i >= warmup:
                    seconds[name].append(time.perf_counter() - start)
    return seconds


def time_models(paths: dict[str, Path], input_shape: list[int], block: int, rounds: int,
                warmup: int = 2) -> dict[str, float]:
    """The p50 (ms) of each model over ``interleaved_runs``."""
    return {name: float(np.median(values)) * 1e3
            for name, values in interleaved_runs(paths, input_shape, dict.fromkeys(paths, block), rounds,
                                                  warmup).items()}


def ort_throughput(path: str | Path, input_shape: list[int], batch: int = 64, threads: int = 0, warmup: int = 5,
                   runs: int = 30) -> dict[str, float]:
    """Server profile: images per second at ``batch`` with ``threads`` (0: all cores)."""
    sess = session(path, threads=threads)
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    times = _time_calls(lambda: sess.run(None, {INPUT_NAME: x}), warmup, runs)
    return {"images_per_s": batch * len(times) / sum(times), "batch": batch, **_percentiles(times)}


# Runs in a fresh interpreter that imports only numpy and onnxruntime, as a device would: the peak
# resident set (VmHWM, reset to the current size first) minus the resident set before the model is loaded.
_PEAK_RSS = """
import sys, numpy as np, onnxruntime as ort
def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
path, batch, threads, *shape = sys.argv[1:]
x = np.random.default_rng(0).standard_normal((int(batch), *map(int, shape)), dtype=np.float32)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = kib("VmRSS:")
opts = ort.SessionOptions()
opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
for _ in range(10):
    sess.run(None, {sess.get_inputs()[0].name: x})
print(kib("VmHWM:") - before)
"""


def ort_peak_memory(path: str | Path, input_shape: list[int], batch: int = 1, threads: int = 1) -> dict[str, float]:
    """Resident-set growth (MiB) of loading ``path`` into onnxruntime and running ``batch`` images,
    measured in a fresh process (Linux /proc; 0 where it is not available)."""
    if not Path("/proc/self/status").exists():
        return {"peak_rss_mib": 0.0, "batch": batch}
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path), str(batch), str(threads), *map(str, input_shape)],
                         capture_output=True, text=True, check=True).stdout
    return {"peak_rss_mib": int(out.split()[-1]) / 1024, "batch": batch}


def torch_latency(model: torch.nn.Module, input_shape: list[int], batch: int = 1, threads: int = 1,
                  warmup: int = 50, runs: int = 300) -> dict[str, float]:
    """The same edge profile on PyTorch eager (inference mode), for the ORT/eager ratio."""
    model = model.eval().cpu()
    x = torch.randn(batch, *input_shape)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            times = _time_calls(lambda: model(x), warmup, runs)
    finally:
        torch.set_num_threads(previous)
    return _percentiles(times)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, input_shape: list[int]) -> int:
    """Multiply-accumulates of one image's forward pass (torch's FLOP counter / 2)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.eval().cpu()(torch.zeros(1, *input_shape))
    return counter.get_total_flops() // 2


def onnx_size(path: str | Path) -> int:
    return Path(path).stat().st_size


def onnx_opset(path: str | Path) -> int:
    opsets = onnx.load(str(path), load_external_data=False).opset_import
    return max(o.version for o in opsets if o.domain in ("", "ai.onnx"))


def environment() -> dict[str, str | int]:
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count() or 0, "torch": torch.__version__,
            "onnxruntime": ort.__version__, "onnx": onnx.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def benchmark(onnx_dir: str | Path, student: Callable[[], torch.nn.Module], cfg) -> dict:
    """The benchmark stage's figures: onnxruntime edge and server profiles, peak memory and file size
    of student and teacher in fp32 and int8 (in ``onnx_dir``; the four batch-1 profiles interleaved block by
    block, ``interleaved_runs``, so that the ship stage's int8-or-fp32 decision compares runs made in the
    same machine state), the fp32 student (``student()`` loads it) on PyTorch eager, the ratios between
    them and the environment they were measured in (``cfg``: BenchmarkConfig)."""
    fp32 = {role: f"{onnx_dir}/{role}.onnx" for role in ("student", "teacher")}
    paths = {(role, precision): path for role in fp32 for precision, path in (("fp32", fp32[role]),
                                                                               ("int8", int8_path(fp32[role])))}
    input_shape = json.loads(read_metadata(fp32["student"], METADATA_KEYS)["input_shape"])[1:]
    blocks = {k: block_runs(p, input_shape, cfg.runs, cfg.rounds) for k, p in paths.items()}
    edge = interleaved_runs(paths, input_shape, blocks, cfg.rounds, max(2, cfg.warmup // cfg.rounds))
    report = {role: {} for role in ("student", "teacher")}
    for (role, precision), path in paths.items():
        report[role][precision] = {
            "ort_edge": _percentiles(edge[role, precision]),
            "ort_server": ort_throughput(path, input_shape, cfg.server_batch, 0, cfg.warmup, cfg.server_runs),
            "memory_edge": ort_peak_memory(path, input_shape, 1, 1),
            "memory_server": ort_peak_memory(path, input_shape, cfg.server_batch, 0),
            "file_bytes": onnx_size(path),
        }
    report["student"]["fp32"]["torch_edge"] = torch_latency(student(), input_shape, 1, 1, cfg.warmup, cfg.runs)
    p50 = {(r, p): report[r][p]["ort_edge"]["p50_ms"] for r in ("student", "teacher") for p in ("fp32", "int8")}
    s = report["student"]["fp32"]
    report["ratios"] = {
        "teacher_over_student_ort_p50": p50["teacher", "fp32"] / p50["student", "fp32"],
        "student_int8_speedup_p50": p50["student", "fp32"] / p50["student", "int8"],
        "teacher_int8_speedup_p50": p50["teacher", "fp32"] / p50["teacher", "int8"],
        "student_torch_over_ort_p50": s["torch_edge"]["p50_ms"] / s["ort_edge"]["p50_ms"],
        "student_over_teacher_server_throughput": (s["ort_server"]["images_per_s"]
                                                   / report["teacher"]["fp32"]["ort_server"]["images_per_s"]),
    }
    report["environment"] = {**environment(), "edge_threads": 1, "server_threads": "all",
                             "server_batch": cfg.server_batch}
    return report
