"""What ships: the int8 student only where it passed the accuracy gate and is faster at batch 1 on
the measured edge profile, else the fp32 student; a model card that gives the figures, the decision
and why, and how to run the model with the torch-free predictor."""

from __future__ import annotations


def decide(gate: dict, fp32_p50_ms: float, int8_p50_ms: float) -> tuple[str, str]:
    """``("int8" | "fp32", reason)`` from the int8 gate result (kdcompress.quantize.gate) and the
    batch-1 p50 latencies of both precisions."""
    accuracy = (f"int8 top-1 {gate['int8_top1']:.2%} vs fp32 {gate['fp32_top1']:.2%}, a drop of "
                f"{gate['drop_points']:.2f} points where {gate['max_drop_points']:g} is allowed")
    if not gate["passed"]:
        return "fp32", f"int8 failed the accuracy gate: {accuracy}"
    speed = f"batch-1 p50 {int8_p50_ms:.4f} ms int8 vs {fp32_p50_ms:.4f} ms fp32"
    if int8_p50_ms >= fp32_p50_ms:
        return "fp32", f"int8 passed the accuracy gate ({accuracy}) but is not faster: {speed}"
    return "int8", f"int8 passed the accuracy gate ({accuracy}) and is {fp32_p50_ms / int8_p50_ms:.2f}x faster: {speed}"


def summary(precision: str, evaluation: dict, gate: dict, bench: dict) -> dict:
    """The few figures a user looks at first (the DVC metric ``summary.json``)."""
    chosen, teacher = bench["student"][precision], bench["teacher"]["fp32"]
    top1 = gate["int8_top1"] if precision == "int8" else gate["fp32_top1"]
    return {"int8_shipped": precision == "int8", "top1": top1, "teacher_top1": evaluation["teacher"]["top1"],
            "gap_points": 100.0 * (evaluation["teacher"]["top1"] - top1), "ece": evaluation["student"]["ece"],
            "agreement": evaluation["student"]["agreement"], "p50_ms": chosen["ort_edge"]["p50_ms"],
            "speedup_vs_teacher": teacher["ort_edge"]["p50_ms"] / chosen["ort_edge"]["p50_ms"],
            "size_kib": chosen["file_bytes"] / 1024}


