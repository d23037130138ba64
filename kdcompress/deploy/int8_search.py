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

import dataclasses
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from kdcompress.common.host import cpu_name
from kdcompress.common.int8 import ALL_OP_TYPES, Int8Config, Quantizer, int8_path
from kdcompress.common.onnx import METADATA_KEYS, read_metadata
from kdcompress.deploy.profiling import block_runs, time_models
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


def onnxruntime_graph(path: Path) -> onnx.ModelProto:
    """The graph onnxruntime runs for the file ``path`` after its hardware-independent optimisations
    (level extended: the QDQ fusions into QLinearConv and the like; no layout change for this CPU)."""
    with tempfile.TemporaryDirectory(prefix="kdcompress-int8-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath, opts.log_severity_level = f"{tmp}/optimised.onnx", 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(f"{tmp}/optimised.onnx")


def kept_fp32(graph: onnx.ModelProto, names: Iterable[str]) -> int:
    """How many of the convolutions ``names`` still run in fp32 in ``graph`` (an ``onnxruntime_graph``):
    a Conv between a DequantizeLinear and a QuantizeLinear (a ReLU or clip before the Q is folded into
    it) gets its weights quantized when the file is loaded and runs as QLinearConv."""
    names = set(names)
    return sum(n.op_type in ("Conv", "FusedConv") and n.name in names for n in graph.graph.node)


def write_candidates(quantizer: Quantizer, configs: list[Int8Config], folder: Path,
                     seen: dict | None = None) -> tuple[dict[str, Path], dict[str, str], list[str]]:
    """``(files, timed_as, dropped)``: each configuration's file in ``folder``, by name, but those that
    leave convolutions in fp32 of which onnxruntime keeps none (``dropped``: the file would not run as it
    says); for each file, the first configuration whose ``onnxruntime_graph`` runs the same kernels, whose
    timing it shares (the weights' options, or a scope that quantizes nothing more, change numbers, not
    kernels: timing them apart would let noise choose among equals). ``seen`` (kernels -> configuration)
    carries that over from another call, so a fine-tuned model's candidates share the timings of the
    original's."""
    files, timed_as, dropped, seen = {}, {}, [], {} if seen is None else seen
    convs = {n.name for n in quantizer.graph.graph.node if n.op_type == "Conv"}
    for c in configs:
        path = quantizer.write(c, folder / f"{c.name}.onnx")
        graph = onnxruntime_graph(path)
        if convs & set(c.exclude) and not kept_fp32(graph, c.exclude):
            dropped.append(c.name)
            path.unlink()
            continue
        files[c.name] = path
        timed_as[c.name] = seen.setdefault(tuple(n.op_type for n in graph.graph.node), c.name)
    return files, timed_as, dropped


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
    candidate's file, by name; ``timed_as`` and ``dropped``: see ``write_candidates``). With ``qat`` (the
    same model after quantization-aware fine-tuning, kdcompress.training.qat, as fp32 ONNX) the same list
    of configurations of that file follows, named ``qat-<configuration>``: after the post-training ones
    in the order of simplicity, and gated against the original fp32 model. ``calibration()`` gives the
    calibration batches (once per source). ``decide`` gates them on val logits, times them when
    ``search`` is on, and writes the chosen one as ``{role}.int8.onnx``; ``report`` adds the test figures
    (reported only)."""

    def __init__(self, fp32: str | Path, calibration: Callable[[], Iterable[np.ndarray]], cfg, workdir: Path,
                 search: bool, qat: Path | None = None):
        self.fp32, self.cfg, self.search = Path(fp32), cfg, search
        self.configs, self.models, self.timed_as, self.dropped = {}, {"fp32": self.fp32}, {}, []
        seen: dict = {}
        for prefix, source in (("", self.fp32), *((("qat-", qat),) if qat else ())):
            quantizer = Quantizer(source, calibration(), cfg.calibration, workdir / ("qat" if prefix else "ptq"))
            configs = (candidates(quantizer.graph, cfg.per_channel) if search
                       else [Int8Config(per_channel=cfg.per_channel)])
            configs = [dataclasses.replace(c, name=prefix + c.name) for c in configs]
            files, timed_as, dropped = write_candidates(quantizer, configs, workdir, seen)
            self.configs.update({c.name: c for c in configs if c.name in files})
            self.models.update(files)
            self.timed_as.update(timed_as)
            self.dropped += dropped
        self.written, self.chosen = next(iter(self.configs)), None
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
            block = block_runs(self.fp32, shape, self.cfg.search_runs, self.cfg.search_rounds)
            timed = {name: self.models[name] for name in ("fp32", *self.timed_as.values())}
            p50 = time_models(timed, shape, block, self.cfg.search_rounds)
            for r in results:
                r["timed_as"] = self.timed_as[r["config"]["name"]]
                r["p50_ms"] = p50[r["timed_as"]]
            profile = {"cpu": cpu_name(), "batch": 1, "threads": 1, "runs": block * self.cfg.search_rounds,
                       "rounds": self.cfg.search_rounds, "simpler_within": SIMPLER_WITHIN}
            self._search = {"search": results, "search_dropped": self.dropped, "fp32_p50_ms": p50["fp32"],
                            "search_profile": profile}
        chosen = choose(results) if self.search else next((r for r in results if r["passed"]), None)
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
                "chosen": self.chosen, "source": "qat" if self.written.startswith("qat-") else "ptq",
                "config": config.describe(), **self._search}


def for_tracking(report: dict) -> dict:
    """quantize.json as MLflow metrics (numbers only): each role's search list keyed by candidate name
    (letters, digits, ``_`` and ``-``: valid metric names), its timing, val figures and verdict."""
    keys = ("p50_ms", "val_int8_top1", "drop_points", "passed")
    return {role: {**r, "search": {s["config"]["name"]: {k: s[k] for k in keys} for s in r.get("search", [])}}
            for role, r in report.items()}
