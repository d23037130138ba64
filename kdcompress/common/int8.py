"""int8: static QDQ quantization with onnxruntime.quantization, calibrated on a seeded sample of
training images, in a configuration the .onnx file itself carries (which ops are quantized, which nodes
stay fp32, how the weights are quantized).

Measured on this project's CPU, int8 halves a ResNet-20's batch-1 latency and slows a 24k-parameter
CNN (the quantize/dequantize nodes cost more than the int8 kernels save), so int8 is never assumed:
the gate checks accuracy, the quantize stage's search (kdcompress.deploy.int8_search) and the benchmark
stage measure speed, and the ship stage decides.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from kdcompress.common.onnx import INPUT_NAME, save_onnx, set_metadata

CALIBRATIONS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}
ALL_OP_TYPES = frozenset(QLinearOpsRegistry) | frozenset(QDQRegistry)  # what quantize_static quantizes by default


@dataclass(frozen=True)
class Int8Config:
    """One static QDQ configuration, all of it carried by the written file (no session option): the op
    types quantized (None: every one onnxruntime's quantizer knows, ``ALL_OP_TYPES``), the nodes left in
    fp32, per-channel weight scales, and ``reduce_range`` (7-bit weights, which cannot overflow the u8s8
    kernels of x86 CPUs without VNNI). The default is the project's single configuration."""

    name: str = "all"
    op_types: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    per_channel: bool = True
    reduce_range: bool = False

    def describe(self) -> dict:
        """The configuration as JSON-ready figures (excluded nodes counted, not named)."""
        return {"name": self.name, "op_types": "all" if self.op_types is None else list(self.op_types),
                "fp32_nodes": len(self.exclude), "per_channel": self.per_channel, "reduce_range": self.reduce_range}


def int8_path(fp32_path: str | Path) -> Path:
    """``student.onnx`` -> ``student.int8.onnx``, beside its fp32 twin."""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


class _Batches(CalibrationDataReader):
    """The calibration batches, handed to the calibrator one at a time (quantize_static's
    ``CalibStridedMinMax``: 1), so that it holds one batch's intermediate tensors at a time, its ranges or
    histograms merged batch by batch, instead of every tensor of every calibration image at once (10.3 GB
    for a ResNet-20 at 96 px under entropy calibration, 3.3 GB under min-max). Min-max ranges are the same."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
        self._range: Iterator[np.ndarray] = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = iter(self._batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._range, None)
        return None if batch is None else {INPUT_NAME: batch}


def calibration_batches(loader, samples: int, seed: int) -> Iterator[np.ndarray]:
    """A seeded sample of ``samples`` images of ``loader``'s split (a data loader of the training split, never test),
    as normalised float batches of the loader's batch size."""
    pick = torch.randperm(len(loader), generator=torch.Generator().manual_seed(seed))[:samples]
    return (x.cpu().numpy() for x, _, _ in loader.batches(pick))


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node (an exporter's inlined functions, HardSwish for one) a unique name, so
    that a configuration can leave it in fp32 (``nodes_to_exclude`` goes by name)."""
    taken = {n.name for n in model.graph.node}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = next(name for k in range(len(taken) + 1)
                             if (name := f"{node.op_type}_{index}" + (f"_{k}" if k else "")) not in taken)
            taken.add(node.name)


class Quantizer:
    """One fp32 model, pre-processed (``quant_pre_process``: shape inference and fusions) and calibrated
    once, written as int8 in any number of ``Int8Config``s. The calibration ranges of every tensor any
    configuration may quantize are cached in ``workdir``, so each further configuration costs one
    quantizer pass and no calibration (``calibration`` is read once). ``graph``: the pre-processed model,
    whose node names an ``Int8Config.exclude`` refers to."""

    def __init__(self, fp32_path: str | Path, calibration: Iterable[np.ndarray], method: str, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.prepared, self._cache = workdir / "prepared.onnx", workdir / "calibration.json"
        quant_pre_process(str(fp32_path), str(self.prepared))
        self.graph = onnx.load(str(self.prepared))
        _name_nodes(self.graph)
        onnx.save(self.graph, str(self.prepared))
        self._calibration, self.method = calibration, method
        self._metadata = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}

    def write(self, config: Int8Config, out_path: str | Path) -> Path:
        """The int8 QDQ model of ``config`` at ``out_path`` (uint8 activations, int8 weights), with the
        fp32 model's metadata plus ``kdcompress.precision``, the calibration method and the configuration."""
        if not self._cache.is_file() and config.op_types is not None:
            self.write(Int8Config(), out_path)  # calibrate every quantizable tensor first, for any later config
        reader = None if self._cache.is_file() else _Batches(self._calibration)
        with tempfile.TemporaryDirectory(prefix="kdcompress-quant-") as tmp:
            quantized = Path(tmp) / "int8.onnx"
            quantize_static(self.prepared, quantized, reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(config.op_types or ()), nodes_to_exclude=list(config.exclude),
                            per_channel=config.per_channel, reduce_range=config.reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CALIBRATIONS[self.method], calibration_cache_path=self._cache,
                            extra_options={"CalibStridedMinMax": 1} if reader is not None else None)
            model = onnx.load(str(quantized))
        set_metadata(model, {**self._metadata, "kdcompress.precision": "int8", "kdcompress.calibration": self.method,
                             "kdcompress.int8_config": json.dumps(config.describe())})
        onnx.checker.check_model(model, full_check=True)
        return save_onnx(model, out_path)


def quantize(fp32_path: str | Path, out_path: str | Path, calibration: Iterable[np.ndarray], method: str,
             per_channel: bool = True) -> Path:
    """Write the project's single static int8 QDQ configuration of ``fp32_path`` (every op type onnxruntime
    quantizes, per-channel weights if asked) calibrated on the normalised float batches ``calibration``."""
    with tempfile.TemporaryDirectory(prefix="kdcompress-quant-") as tmp:
        return Quantizer(fp32_path, calibration, method, Path(tmp)).write(Int8Config(per_channel=per_channel),
                                                                          out_path)
