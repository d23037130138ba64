"""Quantization-aware fine-tuning of a distilled student under its own distillation loss and teacher
(``quantize.qat_epochs``), for students whose post-training int8 loses more than the gate allows.

Eager fake quantization that mirrors what the quantize stage's static QDQ file computes at every
convolution and linear layer: the weights as symmetric int8 (per output channel, scale max|w| / 127,
as onnxruntime's quantizer writes them) and the layer's input as asymmetric uint8 over a running
min/max range that contains 0 (as onnxruntime's min-max calibration does), both with straight-through
gradients. The fake quantizers are a parametrization of each weight and a forward pre-hook on each
layer: the model keeps its structure, so a method's feature spots and an fx-split backbone run
unchanged. Batch norm stays a separate layer: with per-channel weights, scaling an output channel after
quantizing it equals quantizing the scaled (folded) weights, so the folded file sees the same numbers.

The student trains through the one training loop (``fit``) with the distill stage's loss, teacher and
augmentation, at ``quantize.qat_lr`` (cosine) for ``qat_epochs``, on all samples with the method's fixed
spots, in fp32; the epoch with the best val top-1 of the fake-quantized model is kept. ``strip`` then
leaves plain fp32 weights that the quantize stage exports, calibrates and searches like the original's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from kdcompress.common.checkpoint import load_model
from kdcompress.common.onnx import read_metadata, save_onnx, to_onnx
from kdcompress.data.loader import fit_loaders
from kdcompress.data.prepared import load_prepared
from kdcompress.methods import build_loss
from kdcompress.runtime import resolve_device, seed_everything
from kdcompress.training.distiller import Distiller
from kdcompress.training.loop import fit, predict
from kdcompress.training.selection import FullData
from kdcompress.types import UserError

LAYERS = (nn.Conv2d, nn.Linear)
EMA = 0.01  # weight of each training batch in the running activation range


class WeightFakeQuant(nn.Module):
    """Symmetric int8 fake quantization of a weight, per output channel (axis 0) or per tensor, range ±127."""

    def __init__(self, per_channel: bool):
        super().__init__()
        self.per_channel = per_channel

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))).clamp_min(1e-12) / 127).float()
            zero = torch.zeros(len(scale), dtype=torch.int32, device=w.device)
            return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)
        scale = float(w.detach().abs().max().clamp_min(1e-12)) / 127
        return torch.fake_quantize_per_tensor_affine(w, scale, 0, -127, 127)


class InputFakeQuant(nn.Module):
    """Asymmetric uint8 fake quantization of a layer's input (or output) over its running [min, max] (EMA of the
    training batches' extremes, widened to contain 0); in eval mode the range is frozen."""

    def __init__(self):
        super().__init__()
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            low, high = x.detach().amin().float(), x.detach().amax().float()
            if self.seen:
                low, high = torch.lerp(self.low, low, EMA), torch.lerp(self.high, high, EMA)
            self.low.copy_(low), self.high.copy_(high), self.seen.fill_(True)
        low, high = self.low.clamp(max=0), self.high.clamp(min=0)
        scale = ((high - low) / 255).clamp_min(1e-12).reshape(1)
        zero = (-low / scale).round().clamp(0, 255).to(torch.int32).reshape(1)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


def _quantize_input(layer: nn.Module, args: tuple) -> tuple:
    return (layer.input_fake_quant(args[0]), *args[1:])


def _quantize_output(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return layer.output_fake_quant(out)


def fake_quantize(model: nn.Module, per_channel: bool = True) -> nn.Module:
    """Give every convolution and linear layer of ``model`` (in place) an int8 weight and a uint8 input
    fake quantizer, and a linear layer one of its output too (the file quantizes a Gemm's output, where a
    convolution's is the next layer's input); ``strip`` undoes it. Returns ``model``."""
    for layer in (m for m in model.modules() if isinstance(m, LAYERS)):
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant(per_channel))
        layer.input_fake_quant = InputFakeQuant().to(layer.weight.device)
        layer._qat_hooks = [layer.register_forward_pre_hook(_quantize_input)]
        if isinstance(layer, nn.Linear):
            layer.output_fake_quant = InputFakeQuant().to(layer.weight.device)
            layer._qat_hooks.append(layer.register_forward_hook(_quantize_output))
    return model


def strip(model: nn.Module) -> nn.Module:
    """``model`` (in place) without the fake quantizers: the trained fp32 weights, its original structure."""
    for layer in (m for m in model.modules() if isinstance(m, LAYERS)):
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            for hook in layer._qat_hooks:
                hook.remove()
            del layer._qat_hooks, layer.input_fake_quant
            if hasattr(layer, "output_fake_quant"):
                del layer.output_fake_quant
    return model


def finetune(params: dict, paths: SimpleNamespace, create_model: Callable) -> tuple[nn.Module, dict, torch.Tensor]:
    """QAT of the distilled student ``paths.student`` with the distill stage's loss and teacher
    (``paths.teacher``) on ``paths.data``. Returns the stripped fp32 student (CPU, eval), the summary
    (val top-1 of the fake-quantized student, best epoch, seconds) and the fake-quantized student's val
    logits (the parity reference of its int8 file)."""
    cfg, q, base = params["distill"], params["quantize"], params["base"]
    loss = build_loss(cfg.method, params["methods"].get(cfg.method))
    if loss is not None and not loss.selects_samples:
        raise UserError(f"quantize.qat_epochs: {q.qat_epochs} fine-tunes on the real training images; method "
                        f"{cfg.method!r} does not distil on them; allowed: quantize.qat_epochs: 0")
    seed_everything(base.seed, base.num_threads)
    device = resolve_device(base.device)
    data = load_prepared(paths.data, splits=("train", "val"))
    student = fake_quantize(load_model(paths.student, device, create_model, data), q.per_channel)
    teacher = load_model(paths.teacher, device, create_model, data) if loss is not None and loss.needs_teacher \
        else None
    distiller = Distiller(student, teacher, loss, cfg.ce_weight, cfg.kd_weight, cfg.label_smoothing)
    train, val = fit_loaders(data, device, cfg, params["data"].workers, base.seed)
    run_cfg = dataclasses.replace(cfg, epochs=q.qat_epochs, lr=q.qat_lr, lr_schedule="cosine")
    result = fit(distiller, train, val, FullData(len(data.train)), run_cfg, precision="fp32")
    student.load_state_dict(result.best_state)
    logits, _ = predict(student, val, desc="qat val")
    summary = {"epochs": q.qat_epochs, "lr": q.qat_lr, "best_epoch": result.best_epoch,
               "fake_quant_val_top1": result.best_val_acc, "seconds": result.seconds}
    return strip(student).cpu().eval(), summary, logits.cpu()


def fine_tuned_onnx(params: dict, paths: SimpleNamespace, create_model: Callable,
                    folder: Path) -> tuple[Path, dict, np.ndarray]:
    """``finetune`` (``paths`` also has ``onnx``, the exported files' folder), the result written as fp32
    ONNX in ``folder`` with the exported student's metadata: its path, the summary, the fake-quantized val
    logits (the quantize stage's ``fine_tune``)."""
    model, summary, logits = finetune(params, paths, create_model)
    meta = read_metadata(Path(paths.onnx) / "student.onnx")
    data_shape = [int(d) for d in json.loads(meta["input_shape"])[1:]]
    proto = to_onnx(model, data_shape, params["export"].opset, meta)
    return save_onnx(proto, folder / "qat.onnx"), summary, logits.numpy()
