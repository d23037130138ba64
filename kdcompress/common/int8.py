"""int8: static QDQ quantization with onnxruntime.quantization, calibrated on a seeded sample of
training images, and the accuracy gate that decides whether an int8 model may ship.

Measured on this project's CPU, int8 halves a ResNet-20's batch-1 latency and slows a 24k-parameter
CNN (the quantize/dequantize nodes cost more than the int8 kernels save), so int8 is never assumed:
the gate checks accuracy here, the benchmark stage measures speed, and the ship stage decides.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from kdcompress.common.onnx import INPUT_NAME, save_onnx, set_metadata

CALIBRATIONS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}


def int8_path(fp32_path: str | Path) -> Path:
    """``student.onnx`` -> ``student.int8.onnx``, beside its fp32 twin."""
    path = Path(fp32_path)
    return path.with_name(f"{path.stem}.int8{path.suffix}")


class _Batches(CalibrationDataReader):
    def __init__(self, batches: Iterable[np.ndarray]):
        self._batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}


def calibration_batches(loader, samples: int, seed: int) -> Iterator[np.ndarray]:
    """A seeded sample of ``samples`` images of ``loader``'s split (a data loader of the training split, never test),
    as normalised float batches of the loader's batch size."""
    pick = torch.randperm(len(loader), generator=torch.Generator().manual_seed(seed))[:samples]
    return (x.cpu().numpy() for x, _, _ in loader.batches(pick))


def quantize(fp32_path: str | Path, out_path: str | Path, calibration: Iterable[np.ndarray], method: str,
             per_channel: bool = True) -> Path:
    """Write a static int8 QDQ model of ``fp32_path`` (uint8 activations, int8 weights, per-channel
    weights if asked) calibrated on the normalised float batches ``calibration``; the fp32 model's
    metadata is kept, plus ``kdcompress.precision`` and the calibration method."""
    with tempfile.TemporaryDirectory(prefix="kdcompress-quant-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + fusions before calibration
        quantize_static(prepared, quantized, _Batches(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CALIBRATIONS[method])
        model = onnx.load(str(quantized))
    metadata = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
    set_metadata(model, {**metadata, "kdcompress.precision": "int8", "kdcompress.calibration": method})
    onnx.checker.check_model(model, full_check=True)
    return save_onnx(model, out_path)


