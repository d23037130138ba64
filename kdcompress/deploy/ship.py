"""What ships: the int8 student only where it passed the accuracy gate (on val) and is faster at batch 1
on the measured edge profile, else the fp32 student; a model card that gives the figures, the decision
and why, and how to run the model with the torch-free predictor. Every decision reads val figures;
test figures are only reported."""

from __future__ import annotations


def decide(quant: dict, fp32_p50_ms: float, int8_p50_ms: float) -> tuple[str, str]:
    """``("int8" | "fp32", reason)`` from the student's quantize result (its val figures and the gate's
    verdict, kdcompress.deploy.quantize; its test figures are not read) and the batch-1 p50 latencies of
    both precisions."""
    val = quant["val"]
    accuracy = (f"val int8 top-1 {val['int8_top1']:.2%} vs fp32 {val['fp32_top1']:.2%}, a drop of "
                f"{val['drop_points']:.2f} points where {quant['max_drop_points']:g} is allowed")
    if not quant["passed"]:
        return "fp32", f"int8 failed the accuracy gate: {accuracy}"
    speed = f"batch-1 p50 {int8_p50_ms:.4f} ms int8 vs {fp32_p50_ms:.4f} ms fp32"
    if int8_p50_ms >= fp32_p50_ms:
        return "fp32", f"int8 passed the accuracy gate ({accuracy}) but is not faster: {speed}"
    return "int8", f"int8 passed the accuracy gate ({accuracy}) and is {fp32_p50_ms / int8_p50_ms:.2f}x faster: {speed}"


def summary(precision: str, evaluation: dict, quant: dict, bench: dict) -> dict:
    """The few figures a user looks at first (the DVC metric ``summary.json``): the shipped model's val
    top-1 (what the decision saw) and, apart, its test figures (reported)."""
    chosen, teacher = bench["student"][precision], bench["teacher"]["fp32"]
    p50_ms = chosen["ort_edge"]["p50_ms"]
    test_top1, teacher_top1 = quant["test"][f"{precision}_top1"], evaluation["teacher"]["top1"]
    return {"int8_shipped": precision == "int8", "val": {"top1": quant["val"][f"{precision}_top1"]},
            "test": {"top1": test_top1, "teacher_top1": teacher_top1, "gap_points": 100.0 * (teacher_top1 - test_top1),
                     "ece": evaluation["student"]["ece"], "agreement": evaluation["student"]["agreement"]},
            "p50_ms": p50_ms, "speedup_vs_teacher": teacher["ort_edge"]["p50_ms"] / p50_ms,
            "size_kib": chosen["file_bytes"] / 1024}
