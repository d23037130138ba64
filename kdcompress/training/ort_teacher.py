"""The frozen teacher served by onnxruntime: on a CPU its forward pass is most of a distillation
epoch (the teacher has ~16x the student's MACs), and onnxruntime runs it faster than PyTorch eager.

``OrtTeacher(model, input_shape)`` exports ``model.extract`` (logits, embedding and every named
stage output) to an in-memory ONNX graph, checks it against PyTorch on a probe batch, and from
then on answers ``extract(x)`` with the same ``ModelOutput`` the PyTorch teacher gives. It has no
parameters and no gradients, so it only stands in for a teacher that losses run forward without
grad (``DistillLoss.needs_teacher_grad`` is False). Stage-by-stage runs (``run``: the spot-adaptive
graft, which back-propagates through the teacher to its policy) go to the PyTorch model it keeps.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcompress.common.onnx import INPUT_NAME, ParityError, save_onnx, session, to_onnx
from kdcompress.types import ModelOutput, UserError


def use_ort_teacher(runtime: str, loss, device: torch.device) -> bool:
    """Serve the frozen teacher with onnxruntime (``distill.teacher_runtime``)? ``auto``: on the CPU,
    unless the method needs the teacher's grads; an impossible explicit choice is a UserError."""
    needs_grad = loss is not None and loss.needs_teacher_grad
    if runtime == "onnxruntime" and (device.type != "cpu" or needs_grad):
        why = "the device is not the CPU" if device.type != "cpu" else "this method back-propagates through it"
        raise UserError(f"distill.teacher_runtime: 'onnxruntime' is not possible here ({why}); allowed: auto, torch")
    return runtime == "onnxruntime" or (runtime == "auto" and device.type == "cpu" and not needs_grad)


class _Extract(nn.Module):
    """``extract`` as a flat tuple: (logits, embedding, *stage outputs), what ONNX can return."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.extract(x)
        return (out.logits, out.embedding, *out.features.values())


class OrtTeacher(nn.Module):
    def __init__(self, model: nn.Module, input_shape: list[int], threads: int = 0, opset: int = 18,
                 atol: float = 1e-4):
        super().__init__()
        model = model.eval().to("cpu")
        self.model = model
        probe = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model.extract(probe)
        self.stages = list(out.features)
        out_names = ("logits", "embedding", *self.stages)  # the order _Extract returns them in
        self.proto = to_onnx(_Extract(model), input_shape, opset, {}, output_names=out_names)
        self.threads = threads or torch.get_num_threads()
        self.session = session(self.proto.SerializeToString(), threads=self.threads, spin=False)
        expected = (out.logits, out.embedding, *out.features.values())
        for name, got, want in zip(out_names, self._run(probe), expected, strict=True):
            diff = (got - want).abs().max().item()
            if diff > atol * max(1.0, want.abs().max().item()):
                raise ParityError(f"onnxruntime teacher: output {name!r} differs from PyTorch by {diff:.3g}; "
                                  f"(allowed: export.atol={atol:g} of its scale); set distill.teacher_runtime: torch")

    def int8(self, calibration: Iterable[np.ndarray], method: str = "minmax", per_channel: bool = True) -> OrtTeacher:
        """This teacher quantized to int8 (static QDQ, calibrated with ``method`` on the normalised batches
        ``calibration``): about twice as fast on a CPU, for passes that only rank samples."""
        from kdcompress.common.int8 import quantize

        with tempfile.TemporaryDirectory(prefix="kdcompress-teacher-") as tmp:
            fp32 = save_onnx(self.proto, Path(tmp) / "teacher.onnx")
            int8 = quantize(fp32, Path(tmp) / "teacher.int8.onnx", calibration, method, per_channel)
            twin = copy.copy(self)
            twin.session = session(int8.read_bytes(), threads=self.threads, spin=False)
        return twin

    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        arrays = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x.detach().cpu().numpy())})
        return [torch.from_numpy(a) for a in arrays]

    def extract(self, x: torch.Tensor) -> ModelOutput:
        logits, embedding, *features = (t.to(x.device) for t in self._run(x))
        return ModelOutput(logits=logits, features=dict(zip(self.stages, features)), embedding=embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extract(x).logits

    def boundaries(self) -> list[str]:
        return self.model.boundaries()

    def run(self, x: torch.Tensor, start: str | None, stop: str) -> torch.Tensor:
        return self.model.run(x, start, stop)
