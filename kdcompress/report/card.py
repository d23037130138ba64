"""The one model card: the markdown shipped beside ``model.onnx``."""

from __future__ import annotations

import json


def card(metadata: dict[str, str], precision: str, reason: str, evaluation: dict, export: dict, quant: dict,
         bench: dict) -> str:
    """The markdown model card shipped beside ``model.onnx``: what to feed it, the decision and why, the
    figures of student and teacher, each labelled with its split (val: the decision's, test: reported only),
    the export's parity check."""
    classes = json.loads(metadata["classes"])
    def row(name, fmt, get):
        return (f"| {name} | " + " | ".join(fmt(get(bench[r][p], quant[r], p)) for r in ("student", "teacher")
                                          for p in ("fp32", "int8")) + " |")

    env, parity, gate, teacher_gate = bench["environment"], export["student"], quant["student"], quant["teacher"]
    lines = [
        f"# {metadata['kdcompress.architecture']} student, shipped as {precision}", "",
        f"**Decision: {precision}.** {reason}.", "",
        f"Latencies measured on {env['cpu']}{_search_host(gate)}: int8 kernels differ between CPUs, and an ARM "
        "device (or another x86 CPU) may decide differently; rerun the quantize, benchmark and ship stages there to "
        "decide for it.", "",
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
        row("top-1 on val (decision), ONNX", "{:.2%}".format, lambda b, g, p: g["val"][f"{p}_top1"]),
        row("top-1 on test (reported), ONNX", "{:.2%}".format, lambda b, g, p: g["test"][f"{p}_top1"]),
        row("batch-1 p50 ms (1 thread)", "{:.4f}".format, lambda b, g, p: b["ort_edge"]["p50_ms"]),
        row("batch-1 p90 / p99 ms", lambda v: f"{v[0]:.4f} / {v[1]:.4f}",
            lambda b, g, p: (b["ort_edge"]["p90_ms"], b["ort_edge"]["p99_ms"])),
        row(f"batch-{env['server_batch']} images/s (all cores)", "{:,.0f}".format,
            lambda b, g, p: b["ort_server"]["images_per_s"]),
        row("peak memory MiB (batch 1)", "{:.1f}".format, lambda b, g, p: b["memory_edge"]["peak_rss_mib"]),
        row("file KiB", "{:.1f}".format, lambda b, g, p: b["file_bytes"] / 1024), "",
        f"Decisions are made on the val split ({gate['val']['samples']} images; the int8 gate: int8 val top-1 at "
        f"most {gate['max_drop_points']:g} points below fp32); the test split ({gate['test']['samples']} images) is "
        "only reported.", "",
        f"int8 vs fp32 top-1 agreement: val (decision) student {gate['val']['agreement']:.2%}, teacher "
        f"{teacher_gate['val']['agreement']:.2%}; test (reported) student {gate['test']['agreement']:.2%}, teacher "
        f"{teacher_gate['test']['agreement']:.2%} (calibration: {gate['calibration']}, {gate['calibration_samples']} "
        f"training images{_configuration(gate)}).", "",
        *_search_table(gate),
        "## Student metrics on test, reported (fp32, PyTorch)", "",
        "| metric | value |", "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in evaluation["student"].items()], "",
        f"{parity['params']:,} parameters, {parity['macs'] / 1e6:.2f} M MACs per image, ONNX opset "
        f"{metadata['opset']}. Parity ONNX vs PyTorch on {parity['samples']} val images: max |dlogit| "
        f"{parity['max_abs_diff']:.2e}, top-1 agreement {parity['top1_agreement']:.2%}.", ""]
    return "\n".join(lines)


SCOPES = ("`all`: every op type onnxruntime quantizes (the single configuration of `quantize.search: false`); "
          "`conv_gemm`: Conv, Gemm and MatMul with the ReLU/clip folded into them; `conv_gemm_eltwise`: plus Add, Mul "
          "and pooling; `_dw_fp32` / `_se_fp32`: depthwise convolutions (with their activations) / squeeze-excitation "
          "blocks left in fp32; `-per_tensor`, `-per_channel`, `-reduce_range` (7-bit): the weights' options changed")


def _search_host(quant: dict) -> str:
    return f" (the int8 configuration search on {quant['search_profile']['cpu']})" if quant.get("search") else ""


def _configuration(quant: dict) -> str:
    return f"; student int8 configuration `{quant['config']['name']}`" if "config" in quant else ""


def _search_table(quant: dict) -> list[str]:
    """The student's int8 search (kdcompress.deploy.int8_search), one row per candidate in the order of
    simplicity; nothing when the stage ran one configuration."""
    if not quant.get("search"):
        return []
    profile, fp32, chosen = quant["search_profile"], quant["fp32_p50_ms"], quant["chosen"]

    def row(s: dict) -> str:
        name = s["config"]["name"]
        same = f", the kernels of {s['timed_as']}" if s.get("timed_as", name) != name else ""
        return (f"| {f'**{name}**' if name == chosen else name} | {s['p50_ms']:.4f} ({fp32 / s['p50_ms']:.2f}x"
                f"{same}) | {s['val_int8_top1']:.2%} | {s['drop_points']:.2f} | "
                f"{'passed' if s['passed'] else 'failed'} |")

    verdict = (f"The int8 candidate: **{chosen}**, the fastest that passed the gate (among those within "
               f"{profile['simpler_within']:.0%} of it, the first in this order); it ships only if the benchmark "
               "finds it faster than fp32." if chosen else
               "No configuration passed the gate: no int8 candidate, fp32 ships.")
    return [
        "## int8 configurations searched (student)", "",
        f"Each timed at batch {profile['batch']} on {profile['threads']} thread (p50 of {profile['runs']} runs in "
        f"{profile['rounds']} blocks, interleaved with the other candidates', on {profile['cpu']}; fp32 {fp32:.4f} ms) "
        f"and gated on val, in order of simplicity; a candidate whose onnxruntime graph runs the same kernels as "
        f"a simpler one shares its timing. {SCOPES}.", "",
        "| configuration | batch-1 p50 ms (vs fp32) | val int8 top-1 (decision) | drop (points) | gate |",
        "| --- | --- | --- | --- | --- |", *map(row, quant["search"]), "", *_dropped(quant), *_qat(quant), verdict, ""]


def _qat(quant: dict) -> list[str]:
    """Where the int8 file comes from, when quantization-aware fine-tuning ran (quantize.qat_epochs)."""
    if "qat" not in quant:
        return []
    q, c = quant["qat"], quant["compared"]
    source = ("quantization-aware fine-tuning (a `qat-` configuration)" if quant["source"] == "qat" else
              "post-training quantization of the distilled student")
    return [f"`qat-` configurations: the student after {q['epochs']} epochs of quantization-aware fine-tuning under "
            f"its distillation loss (lr {q['lr']:g}; fake-quantized val top-1 {q['fake_quant_val_top1']:.2%}; its "
            f"`qat-all` file agrees with the fake-quantized model on {q['parity']['top1_agreement']:.2%} of val "
            f"images). In configuration `all`, post-training int8 val top-1 {c['all']['val_int8_top1']:.2%}, "
            f"quantization-aware {c['qat-all']['val_int8_top1']:.2%} (test, reported: "
            f"{c['all']['test_int8_top1']:.2%} and {c['qat-all']['test_int8_top1']:.2%}). The int8 file written "
            f"comes from {source}.", ""]


def _dropped(quant: dict) -> list[str]:
    names = quant.get("search_dropped")
    return [f"Left out: {', '.join(f'`{n}`' for n in names)}: onnxruntime would run none of their fp32 convolutions "
            "in fp32 (a Conv between a DequantizeLinear and a QuantizeLinear, a ReLU before the Q folded into it, gets "
            "its weights quantized when the file is loaded).", ""] if names else []

