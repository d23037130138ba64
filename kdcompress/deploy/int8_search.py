"""The measured int8 search of the quantize stage: a bounded list of static QDQ configurations of one
model (which op types are quantized, depthwise convolutions or squeeze-excitation blocks left in fp32,
per-channel weights, ``reduce_range``; only what the .onnx file carries), each timed on the edge
profile (batch 1, one thread) and checked on the val split by the accuracy gate.

The int8 candidate the ship stage considers is the fastest one that passes the gate; among those within
``SIMPLER_WITHIN`` of it the simplest wins (the list is in a fixed order of simplicity), so that a rerun
on the same host makes the same choice despite timing noise. None passing: no int8 candidate, and the
simplest configuration is written for inspection (the ship stage keeps fp32). The timings are this
host's: another CPU, an ARM one above all, may choose differently."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from kdcompress.common.int8 import ALL_OP_TYPES, Int8Config, Quantizer, int8_path
from kdcompress.common.onnx import METADATA_KEYS, read_metadata
from kdcompress.deploy.profiling import cpu_name, ort_latency
from kdcompress.deploy.quantize import accuracy, gate
from kdcompress.io import atomic_write

SIMPLER_WITHIN = 0.05  # a simpler candidate at most 5 % slower than the fastest passing one wins
FOLDED = ("Relu", "Clip")  # activations the quantizer folds into the range of the op before them
CONV_GEMM = ("Conv", "Gemm", "MatMul", *FOLDED)
ELTWISE_POOL = (*CONV_GEMM, "Add", "Mul", "AveragePool", "GlobalAveragePool", "MaxPool")
ACTIVATIONS = frozenset({*FOLDED, "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Mul"})
GLOBAL_POOLS = frozenset({"ReduceMean", "GlobalAveragePool"})
SE_MAX_NODES = 10  # pool, two 1x1 convs, their activations (SiLU: two nodes) and the gate fit easily


def depthwise_convs(graph: onnx.ModelProto) -> list[str]:
    """The depthwise convolutions: Conv nodes with ``group`` > 1 and one input channel per group
    (group == input channels), in graph order."""
    weights = {t.name: t for t in graph.graph.initializer}

    def depthwise(node) -> bool:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = weights.get(node.input[1])
        return group > 1 and weight is not None and weight.dims[1] == 1

    return [n.name for n in graph.graph.node if n.op_type == "Conv" and depthwise(n)]


def with_activations(graph: onnx.ModelProto, names: Iterable[str]) -> list[str]:
    """``names`` plus the activation nodes computed from their outputs alone (ReLU, clip, hard-swish as
    x * HardSigmoid(x), SiLU, ...), in graph order. A node left in fp32 needs them in fp32 too: between
    a DequantizeLinear and a QuantizeLinear onnxruntime quantizes an fp32 Conv's weights at load time."""
    inside = set(names)
    constants = {t.name for t in graph.graph.initializer} | {
        o for n in graph.graph.node if n.op_type == "Constant" for o in n.output}
    outputs: set[str] = set()
    for node in graph.graph.node:  # topologically sorted: producers come first
        inputs = [i for i in node.input if i and i not in constants]
        if node.name not in inside and node.op_type in ACTIVATIONS and inputs and set(inputs) <= outputs:
            inside.add(node.name)
        if node.name in inside:
            outputs |= set(node.output)
    return [n.name for n in graph.graph.node if n.name in inside]


def se_blocks(graph: onnx.ModelProto) -> list[str]:
    """The nodes of the squeeze-excitation blocks, in graph order: for a Mul(x, gate) whose gate is
    computed from a global average pool of x, the pool and every node between it and the gate (the
    Mul scales the full feature map and stays with it)."""
    nodes = list(graph.graph.node)
    producer = {o: n.name for n in nodes for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in nodes:
        for i in n.input:
            consumers[i].append(n)
    by_name = {n.name: n for n in nodes}
    found: set[str] = set()
    for pool in (n for n in nodes if n.op_type in GLOBAL_POOLS):
        after, frontier = {pool.name}, [pool]
        while frontier and len(after) <= SE_MAX_NODES:  # what the pool feeds, a few nodes deep
            frontier = [c for n in frontier for o in n.output for c in consumers[o] if c.name not in after]
            after |= {c.name for c in frontier}
        for mul in (c for c in consumers[pool.input[0]] if c.op_type == "Mul"):
            gate = next((i for i in mul.input if i != pool.input[0]), None)
            block, todo = set(), [producer.get(gate)]
            while todo:  # back from the gate, through nodes the pool feeds
                name = todo.pop()
                if name in after and name not in block and name != mul.name:
                    block.add(name)
                    todo += [producer.get(i) for i in by_name[name].input]
            if pool.name in block and len(block) <= SE_MAX_NODES:
                found |= block
    return [n.name for n in nodes if n.name in found]


def quantized_nodes(graph: onnx.ModelProto, config: Int8Config) -> frozenset[str]:
    """The nodes ``config`` asks the quantizer to quantize: two configurations with the same set (and
    the same weights) write the same file."""
    op_types = ALL_OP_TYPES if config.op_types is None else set(config.op_types)
    return frozenset(n.name for n in graph.graph.node if n.op_type in op_types and n.name not in config.exclude)


def candidates(graph: onnx.ModelProto, per_channel: bool) -> list[Int8Config]:
    """The search list for the pre-processed model ``graph``, in a fixed order of simplicity: the op
    scopes (every op type, the project's single configuration, first) with the weights as asked
    (``per_channel``), then with per-channel flipped, then with ``reduce_range``; a scope that does not
    change what is quantized in this graph (no depthwise convolution, no squeeze-excitation) is dropped."""
    dw = tuple(with_activations(graph, depthwise_convs(graph)))
    se = tuple(se_blocks(graph))
    scopes = [("all", None, ()), ("conv_gemm", CONV_GEMM, ()), ("conv_gemm_eltwise", ELTWISE_POOL, ()),
              ("all_dw_fp32", None, dw), ("all_se_fp32", None, se), ("conv_gemm_dw_fp32", CONV_GEMM, dw)]
    weights = [("", per_channel, False), ("-per_tensor" if per_channel else "-per_channel", not per_channel, False),
               ("-reduce_range", per_channel, True)]
    out, seen = [], set()
    for suffix, channel, reduce in weights:
        for name, op_types, exclude in scopes:
            config = Int8Config(name + suffix, op_types, exclude, channel, reduce)
            key = (quantized_nodes(graph, config), channel, reduce)
            if key not in seen:
                seen.add(key)
                out.append(config)
    return out


def time_models(paths: dict[str, Path], input_shape: list[int], runs: int, rounds: int) -> dict[str, float]:
    """Batch-1, one-thread p50 (ms) of each model: the median over ``rounds`` interleaved rounds of
    ``ort_latency`` (``runs`` timed runs each), so that a slow spell of a shared host hits all alike."""
    p50: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            p50[name].append(ort_latency(path, input_shape, 1, 1, max(runs // 5, 5), runs)["p50_ms"])
    return {name: float(np.median(values)) for name, values in p50.items()}


def choose(results: list[dict], within: float = SIMPLER_WITHIN) -> dict | None:
    """The int8 candidate the ship stage considers, from ``results`` in order of simplicity (each with
    ``passed`` and ``p50_ms``): the first passing one at most ``within`` slower than the fastest passing
    one; None when none passes."""
    passing = [r for r in results if r["passed"]]
    if not passing:
        return None
    fastest = min(r["p50_ms"] for r in passing)
    return next(r for r in passing if r["p50_ms"] <= fastest * (1 + within))


class Search:
    """One role's int8 candidates, written in ``workdir`` at construction (``models``: fp32 and every
    candidate's file, by name). ``decide`` gates them on val logits, times them when ``search`` is on,
    and writes the chosen one as ``{role}.int8.onnx``; ``report`` adds the test figures (reported only)."""

    def __init__(self, fp32: str | Path, calibration: Iterable[np.ndarray], cfg, workdir: Path, search: bool):
        self.fp32, self.cfg, self.search = Path(fp32), cfg, search
        quantizer = Quantizer(fp32, calibration, cfg.calibration, workdir)
        configs = candidates(quantizer.graph, cfg.per_channel) if search else [Int8Config(per_channel=cfg.per_channel)]
        self.configs = {c.name: c for c in configs}
        self.models = {"fp32": self.fp32, **{c.name: quantizer.write(c, workdir / f"{c.name}.onnx") for c in configs}}
        self.written, self.chosen = configs[0].name, None
        self._val: dict[str, dict] = {}
        self._search: dict = {}

    def decide(self, val_logits: dict[str, np.ndarray], labels: np.ndarray) -> Path:
        """Gate every candidate on val (``val_logits``: by model name, fp32 included), time them (search
        on), choose, and write the chosen candidate (else the simplest, for inspection) beside the fp32 file."""
        self._val = {name: accuracy(val_logits["fp32"], val_logits[name], labels) for name in self.configs}
        results = [{"config": c.describe(), "val_int8_top1": self._val[name]["int8_top1"],
                    "drop_points": self._val[name]["drop_points"],
                    "passed": gate(self._val[name], self.cfg.max_drop)["passed"]} for name, c in self.configs.items()]
        if self.search:
            shape = json.loads(read_metadata(self.fp32, METADATA_KEYS)["input_shape"])[1:]
            p50 = time_models(self.models, shape, self.cfg.search_runs, self.cfg.search_rounds)
            for r in results:
                r["p50_ms"] = p50[r["config"]["name"]]
            self._search = {"search": results, "fp32_p50_ms": p50["fp32"], "search_profile": {
                "cpu": cpu_name(), "batch": 1, "threads": 1, "runs": self.cfg.search_runs,
                "rounds": self.cfg.search_rounds, "simpler_within": SIMPLER_WITHIN}}
        chosen = choose(results) if self.search else results[0] if results[0]["passed"] else None
        self.chosen = chosen["config"]["name"] if chosen else None
        self.written = self.chosen or results[0]["config"]["name"]
        return atomic_write(int8_path(self.fp32), self.models[self.written].read_bytes())

    def report(self, test_logits: dict[str, np.ndarray], labels: np.ndarray, calibration_samples: int) -> dict:
        """The role's quantize.json entry: the written file's val figures and gate verdict, its test
        figures (``test_logits``: fp32 and the written candidate; reported, never read by a decision),
        the calibration, which configuration was chosen (None: none passed) and, when searched, every
        candidate."""
        val, config = self._val[self.written], self.configs[self.written]
        return {"val": val, "test": accuracy(test_logits["fp32"], test_logits[self.written], labels),
                **gate(val, self.cfg.max_drop), "calibration": self.cfg.calibration,
                "calibration_samples": calibration_samples, "per_channel": config.per_channel,
                "chosen": self.chosen, "config": config.describe(), **self._search}


def for_tracking(report: dict) -> dict:
    """quantize.json as MLflow metrics (numbers only): each role's search list keyed by candidate name
    (letters, digits, ``_`` and ``-``: valid metric names), its timing, val figures and verdict."""
    keys = ("p50_ms", "val_int8_top1", "drop_points", "passed")
    return {role: {**r, "search": {s["config"]["name"]: {k: s[k] for k in keys} for s in r.get("search", [])}}
            for role, r in report.items()}
