"""The int8 accuracy gate that decides whether an int8 model may ship.

Decisions are made on the val split, test is only reported: the quantize stage measures ``accuracy``
on both and keeps them apart (``{"val": ..., "test": ...}``), and ``gate`` is given the val figures
alone, so no test figure can change what passes."""

from __future__ import annotations

import numpy as np


def accuracy(fp32_logits: np.ndarray, int8_logits: np.ndarray, labels: np.ndarray) -> dict:
    """fp32 and int8 top-1 on the same images, the int8 model's drop in percentage points and the
    top-1 agreement between the two."""
    fp32_top1 = float((fp32_logits.argmax(1) == labels).mean())
    int8_top1 = float((int8_logits.argmax(1) == labels).mean())
    return {"fp32_top1": fp32_top1, "int8_top1": int8_top1, "drop_points": 100.0 * (fp32_top1 - int8_top1),
            "agreement": float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean()), "samples": len(labels)}


def gate(val: dict, max_drop_points: float) -> dict:
    """The int8 model passes when its val top-1 (``accuracy`` on the val split) is at most
    ``max_drop_points`` percentage points below the fp32 model's."""
    return {"max_drop_points": max_drop_points, "passed": bool(val["drop_points"] <= max_drop_points)}
