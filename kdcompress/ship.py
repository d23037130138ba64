"""What ships: the int8 student only where it passed the accuracy gate and is faster at batch 1 on
the measured edge profile, else the fp32 student; a model card that gives the figures, the decision
and why, and how to run the model with the torch-free predictor."""

from __future__ import annotations

import json


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


def card(metadata: dict[str, str], precision: str, reason: str, evaluation: dict, quant: dict, bench: dict) -> str:
    """The markdown model card shipped beside ``model.onnx``."""
    classes = json.loads(metadata["classes"])
    def row(name, fmt, get):
        return (f"| {name} | " + " | ".join(fmt(get(bench[r][p], quant[r], p)) for r in ("student", "teacher")
                                          for p in ("fp32", "int8")) + " |")

    env = bench["environment"]
    lines = [
        f"# {metadata['kdcompress.architecture']} student, shipped as {precision}", "",
        f"**Decision: {precision}.** {reason}.", "",
        "## Files", "",
        f"- `model.onnx`: the {precision} model to deploy (one file, no external data; its metadata says how "
        "to feed it).",
        *(["- `model.fp32.onnx`: the same student in fp32, for engines that do not load int8 QDQ graphs "
           "(OpenCV DNN, for one)."] if precision == "int8" else []),
        "- `predict.py`: a predictor that needs only numpy, onnxruntime and Pillow; copy it beside the model.",
        "- `MODEL_CARD.md`: this card.", "",
        "## Run it", "",
        "```bash",
        "pip install numpy onnxruntime pillow",
        "python predict.py model.onnx photo.png more_images/ --top-k 3          # one line per image",
        "python predict.py model.onnx more_images/ --json --threads 1          # one JSON object per line",
        "```", "",
        f"Input `{metadata.get('input_name', 'input')}`: float32 {metadata['input_shape']} (NCHW), "
        f"{metadata['preprocessing']}; mean {metadata['mean']}, std {metadata['std']}. The predictor converts and "
        "resizes any PNG/JPEG (grey or colour) to that shape.",
        f"Output `{metadata.get('output_name', 'logits')}`: float32 [batch, {len(classes)}] raw scores (softmax for "
        f"probabilities). Classes: {', '.join(classes)}.", "",
        f"## Figures (onnxruntime {env['onnxruntime']}, {env['cpu']}, {env['cpu_count']} cores)", "",
        "| | student fp32 | student int8 | teacher fp32 | teacher int8 |", "| --- | --- | --- | --- | --- |",
        row("test top-1 (ONNX)", "{:.2%}".format, lambda b, g, p: g[f"{p}_top1"]),
        row("batch-1 p50 ms (1 thread)", "{:.4f}".format, lambda b, g, p: b["ort_edge"]["p50_ms"]),
        row("batch-1 p90 / p99 ms", lambda v: f"{v[0]:.4f} / {v[1]:.4f}",
            lambda b, g, p: (b["ort_edge"]["p90_ms"], b["ort_edge"]["p99_ms"])),
        row(f"batch-{env['server_batch']} images/s (all cores)", "{:,.0f}".format,
            lambda b, g, p: b["ort_server"]["images_per_s"]),
        row("peak memory MiB (batch 1)", "{:.1f}".format, lambda b, g, p: b["memory_edge"]["peak_rss_mib"]),
        row("file KiB", "{:.1f}".format, lambda b, g, p: b["file_bytes"] / 1024), "",
        f"int8 vs fp32 top-1 agreement on the test split: student {quant['student']['agreement']:.2%}, teacher "
        f"{quant['teacher']['agreement']:.2%} (calibration: {quant['student']['calibration']}, "
        f"{quant['student']['calibration_samples']} training images).", "",
        "## Student test metrics (fp32, PyTorch)", "",
        "| metric | value |", "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in evaluation["student"].items()], ""]
    return "\n".join(lines)
