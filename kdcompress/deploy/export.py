"""The student and teacher as ONNX files: metadata saying how to feed them, checked by the parity gate."""

from __future__ import annotations

import json

from kdcompress.common.onnx import INPUT_NAME, OUTPUT_NAME


def metadata_for(name: str, arch: str, classes: list[str], mean: list[float], std: list[float],
                 input_shape: list[int], opset: int) -> dict[str, str]:
    return {"kdcompress.model": name, "kdcompress.architecture": arch, "classes": json.dumps(classes),
            "mean": json.dumps(mean), "std": json.dumps(std), "input_shape": json.dumps(["batch", *input_shape]),
            "opset": str(opset), "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
            "preprocessing": "x = (pixels / 255 - mean) / std, per channel, NCHW float32"}
