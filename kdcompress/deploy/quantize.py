"""The int8 accuracy gate that decides whether an int8 model may ship."""

from __future__ import annotations

import numpy as np


def gate(fp32_logits: np.ndarray, int8_logits: np.ndarray, labels: np.ndarray, max_drop_points: float) -> dict:
    """The int8 model passes when its top-1 is at most ``max_drop_points`` (percentage points) below
    the fp32 model's on the same images; top-1 agreement between the two is reported beside it."""
    fp32_top1 = float((fp32_logits.argmax(1) == labels).mean())
    int8_top1 = float((int8_logits.argmax(1) == labels).mean())
    drop = 100.0 * (fp32_top1 - int8_top1)
    return {"fp32_top1": fp32_top1, "int8_top1": int8_top1, "drop_points": drop,
            "agreement": float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean()),
            "max_drop_points": max_drop_points, "passed": bool(drop <= max_drop_points), "samples": int(len(labels))}
