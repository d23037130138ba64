"""ONNX export: a single-file graph with named input/output and a dynamic batch axis, metadata,
the full onnx checker, and a parity gate against PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from kdcompress.io import atomic_write
from kdcompress.types import UserError

INPUT_NAME, OUTPUT_NAME = "input", "logits"
METADATA_KEYS = ("classes", "mean", "std", "input_shape")  # what a reader needs to feed the model


class ParityError(UserError):
    """The exported graph does not reproduce the PyTorch model."""


def to_onnx(model: torch.nn.Module, input_shape: list[int], opset: int, metadata: dict[str, str],
            output_names: tuple[str, ...] = (OUTPUT_NAME,)) -> onnx.ModelProto:
    """Trace ``model`` (by default a classifier: logits only) into an ONNX model with a dynamic
    batch axis; ``output_names`` names the outputs of a model that returns a tuple."""
    model = model.eval().to("cpu", memory_format=torch.contiguous_format)
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                output_names=list(output_names), dynamic_shapes=({0: batch},), optimize=True,
                                verbose=False)
    proto = program.model_proto
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace the model's metadata with ``metadata``."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def save_onnx(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Write one self-contained .onnx file (no external data), atomically."""
    return atomic_write(path, proto.SerializeToString())


def read_metadata(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, str]:
    """The metadata of an ONNX file that must exist, parse and pass the checker; a missing
    ``required`` key is a one-line UserError too."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as err:  # noqa: BLE001 - protobuf and checker errors come in many types
        raise UserError(f"{path}: not a valid ONNX model ({str(err).splitlines()[0][:200]})") from None
    metadata = {p.key: p.value for p in proto.metadata_props}
    missing = [key for key in required if key not in metadata]
    if missing:
        raise UserError(f"{path}: metadata key {missing[0]!r} missing; a kdcompress export has: {', '.join(required)}")
    return metadata


def session(path: str | Path | bytes, threads: int = 0, sequential: bool = True,
            spin: bool = True, arena: bool = True) -> ort.InferenceSession:
    """A CPU session from a file or serialized bytes. ``spin=False`` stops idle worker threads from
    busy-waiting between runs: needed when PyTorch works on the same cores in between. ``arena=False``
    returns a run's activation memory when the run ends instead of keeping it for the next (for sessions
    held side by side)."""
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts,
                                providers=["CPUExecutionProvider"])


def ort_predict(path: str | Path | bytes, inputs) -> np.ndarray:
    """Logits of the ONNX model (a file or serialized bytes) for an iterable of float batches (torch
    tensors or arrays), concatenated."""
    sess = session(path)
    return np.concatenate([sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x)})[0] for x in inputs])


def ort_predict_many(models: dict[str, str | Path], inputs) -> dict[str, np.ndarray]:
    """``ort_predict`` of several models in one pass over ``inputs`` (each batch made once: a streamed
    split is decoded once for all of them). The sessions keep no memory arena, so that the peak is one
    run's activations, not one per model (an EfficientNet-B0 at 64 px in batches of 1024: 2.3 GB each,
    for the quantize stage's 18 candidates 40 GB)."""
    sessions = {name: session(path, arena=False) for name, path in models.items()}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in models}
    for x in inputs:
        x = np.ascontiguousarray(x)
        for name, sess in sessions.items():
            parts[name].append(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    return {name: np.concatenate(p) for name, p in parts.items()}


def parity(model: str | Path | bytes, torch_logits: torch.Tensor, inputs, atol: float, name: str = "") -> dict:
    """Run the ONNX model (a file, or serialized bytes checked before anything is written) over
    ``inputs`` (an iterable of float batches) and compare with ``torch_logits`` (same order). Raises
    ParityError, naming ``name`` (default: the file), where a logit differs by more than ``atol``. Within it,
    a top-1 class can change only where PyTorch's two best logits lie within 2 x ``atol`` of each other (a
    near-tie): the agreement is reported, not gated; a deep net whose kernels round differently in
    onnxruntime (EfficientNet's sigmoids: 3e-3 on logits up to 23) needs a larger ``atol``."""
    onnx_logits = ort_predict(model, inputs)
    path = name or model
    ref = torch_logits.numpy()
    if onnx_logits.shape != ref.shape:
        raise ParityError(f"parity: ONNX output shape {onnx_logits.shape} != PyTorch {ref.shape}")
    result = {"max_abs_diff": float(np.abs(onnx_logits - ref).max()),
              "top1_agreement": float((onnx_logits.argmax(1) == ref.argmax(1)).mean()),
              "samples": int(len(ref)), "atol": atol}
    if result["max_abs_diff"] > atol:
        raise ParityError(f"parity check failed for {path}: max |dlogit| {result['max_abs_diff']:.3g} "
                          f"(allowed <= {atol:g}, export.atol), top-1 agreement {result['top1_agreement']:.4%}")
    return result


