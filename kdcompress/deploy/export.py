"""The student and teacher as ONNX files: metadata saying how to feed them, checked by the parity gate."""

from __future__ import annotations

import json

from kdcompress.common.onnx import INPUT_NAME, OUTPUT_NAME


def metadata_for(name: str, arch: str, classes: list[str], mean: list[float], std: list[float],
                 input_shape: list[int], opset: int, crop_fraction: float = 1.0) -> dict[str, str]:
    """What a reader needs to feed the model, as the evaluation fed it: predict.py decodes a file
    (``decode_image``), centre-crops ``crop_fraction`` of its shorter side keeping the aspect ratio and
    resizes to the input size (``eval_pixels``), then normalises."""
    return {"kdcompress.model": name, "kdcompress.architecture": arch, "classes": json.dumps(classes),
            "mean": json.dumps(mean), "std": json.dumps(std), "input_shape": json.dumps(["batch", *input_shape]),
            "crop_fraction": json.dumps(crop_fraction), "opset": str(opset), "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "preprocessing": f"decode (EXIF-rotated, RGB or grey), centre box of {crop_fraction:g} x the shorter "
                             "side resized to H x W (bilinear, antialiased), x = (pixels / 255 - mean) / std, per "
                             "channel, NCHW float32"}
