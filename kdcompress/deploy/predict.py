"""Edge predictor for kdcompress ONNX classifiers: image files or folders in, top-k classes out.

It needs only numpy, onnxruntime and Pillow (no PyTorch, no other kdcompress module), so this one
file can be copied to a device beside the model and run as ``python predict.py model.onnx images/``.
All pre-processing (input size, channels, mean/std, class names) comes from the model's ONNX
metadata, written by ``kdcompress.export.metadata_for``.

    python predict.py MODEL.onnx IMAGE_OR_FOLDER... [--top-k K] [--json] [--threads N] [--batch-size B]

From Python: ``load("model.onnx").predict_files(["images/"], top_k=3)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
REQUIRED_KEYS = ("classes", "mean", "std", "input_shape")  # as kdcompress.export.METADATA_KEYS


class ModelError(Exception):
    """The model file is missing, unreadable, or not a kdcompress classifier."""


class ImageError(Exception):
    """One input path is missing or not a readable image."""


def _metadata(meta: dict[str, str]) -> tuple[list[int], np.ndarray, np.ndarray, list[str]]:
    """Parse and check (C, H, W), mean [C], std [C] and the class names; raises ValueError."""
    for key in REQUIRED_KEYS:
        if key not in meta:
            raise ValueError(f"missing metadata key {key!r}")
    values = {}
    for key in REQUIRED_KEYS:
        try:
            values[key] = json.loads(meta[key])
        except json.JSONDecodeError:
            raise ValueError(f"metadata key {key!r} is not JSON: {meta[key][:80]!r}") from None
    shape, mean, std, classes = (values[k] for k in ("input_shape", "mean", "std", "classes"))
    if not (isinstance(shape, list) and len(shape) == 4
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])):
        raise ValueError(f"metadata 'input_shape' is not [batch, C, H, W]: {meta['input_shape']}")
    channels = shape[1]
    if channels not in (1, 3):
        raise ValueError(f"input_shape has {channels} channels; images need 1 (grey) or 3 (RGB)")
    for key, value in (("mean", mean), ("std", std)):
        if not (isinstance(value, list) and len(value) == channels
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
            raise ValueError(f"metadata {key!r} is not a list of {channels} numbers: {meta[key]}")
    if any(s == 0 for s in std):
        raise ValueError(f"metadata 'std' has a zero: {meta['std']}")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ValueError("metadata 'classes' is not a non-empty list of names")
    as_column = lambda v: np.asarray(v, dtype=np.float32).reshape(-1, 1, 1)  # noqa: E731
    return shape[1:], as_column(mean), as_column(std), classes


def find_images(args: Iterable[str | Path]) -> Iterator[tuple[str, str | None]]:
    """Expand the arguments into ``(path, error)``: a file is yielded as given (whatever its
    extension); a folder yields its image files (by extension, case-insensitive), recursively and
    sorted, hidden files and folders skipped; a missing path or an image-less folder yields an error."""
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                yield str(arg), "no image files in this folder"
            yield from ((str(p), None) for p in found)
        elif path.is_file():
            yield str(arg), None
        else:
            yield str(arg), "not a regular file" if path.exists() else "no such file or folder"


MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (a 9459 x 9459 image)
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def decode_image(path: str | Path, channels: int, min_side: int | None = None) -> Image.Image:
    """THE decode of kdcompress: every image file that prepare, training, evaluation and this predictor
    read goes through it. The first frame, EXIF orientation applied (phone photos), converted to grey
    ("L", ``channels`` 1) or RGB: palette images via RGB(A), 16-bit grey ("I;16", or "I"/"F" with values
    above 255) scaled to 8 bits, CMYK and YCbCr converted by Pillow, alpha dropped (as Pillow's convert
    does). A JPEG is decoded at the smallest power-of-two reduction whose shorter side is still at least
    ``min_side`` (libjpeg's DCT scaling: the same pixels wherever it runs). An image of more than
    MAX_PIXELS pixels is refused before decoding. Raises ImageError."""
    try:
        with warnings.catch_warnings(), Image.open(path) as img:
            warnings.simplefilter("ignore")  # palette transparency, EXIF warnings
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{img.width} x {img.height} pixels is over the limit of {MAX_PIXELS:,} "
                                 "(a decompression bomb?)")
            if min_side and img.format == "JPEG":
                scale = min(img.width, img.height) / min_side
                if scale >= 2:
                    img.draft(img.mode, (math.ceil(img.width / scale), math.ceil(img.height / scale)))
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in HIGH_BIT_MODES:
                grey = np.asarray(img, dtype=np.float64)
                if img.mode.startswith("I;16") or grey.max(initial=0) > 255:
                    grey = grey / 257  # 0..65535 -> 0..255
                img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
            elif img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            return img.convert("L" if channels == 1 else "RGB")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("no such file or folder") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (cannot identify image file)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError) as e:
        reason = getattr(e, "strerror", None) or next(iter(str(e).splitlines()), "") or type(e).__name__
        raise ImageError(f"cannot read the image ({reason})") from None


def center_box(width: int, height: int, size: tuple[int, int], fraction: float) -> tuple[float, float, float, float]:
    """The evaluation crop: the largest centred box of the output's aspect ratio (``size`` = (W, H)),
    scaled by ``fraction`` (ImageNet's 0.875 for photos; 1.0 keeps the whole shorter side). Resizing
    this box to ``size`` is "resize the shorter side to size / fraction, centre-crop size" in one step,
    and keeps the aspect ratio."""
    aspect = size[0] / size[1]
    w = min(width, height * aspect) * fraction
    h = w / aspect
    x0, y0 = (width - w) / 2, (height - h) / 2
    return x0, y0, x0 + w, y0 + h


def eval_pixels(img: Image.Image, size: tuple[int, int], fraction: float = 1.0) -> np.ndarray:
    """A decoded image (``decode_image``) as the model's evaluation input: uint8 [H, W] or [H, W, 3],
    the centre box (``center_box``) resized to ``size`` = (W, H) with Pillow's antialiased bilinear."""
    box = center_box(img.width, img.height, size, fraction)
    if img.size != size or box != (0, 0, *size):
        img = img.resize(size, Image.Resampling.BILINEAR, box=box)
    return np.asarray(img, dtype=np.uint8)


def read_pixels(path: str | Path, channels: int, size: tuple[int, int], fraction: float = 1.0) -> np.ndarray:
    """One image file as the model's evaluation input (``decode_image`` then ``eval_pixels``)."""
    return eval_pixels(decode_image(path, channels, math.ceil(max(size) / fraction)), size, fraction)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """An onnxruntime CPU session plus the model's pre-processing, read from its metadata."""

    def __init__(self, model_path: str | Path, threads: int = 0):
        path = Path(model_path)
        if not path.is_file():
            raise ModelError(f"{model_path}: no such model file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # errors only: no optimizer warnings on the user's terminal
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ModelError(f"{model_path}: cannot load the ONNX model ({first[:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            (self.channels, self.height, self.width), self.mean, self.std, self.classes = _metadata(meta)
        except ValueError as e:
            raise ModelError(f"{model_path}: not a kdcompress model ({e})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name = meta.get("input_name", inputs[0].name)
        self.output_name = meta.get("output_name", outputs[0].name)
        for name, nodes in ((self.input_name, inputs), (self.output_name, outputs)):
            if name not in [n.name for n in nodes]:
                raise ModelError(f"{model_path}: not a kdcompress model (the graph has no {name!r})")
        out_shape = next(o.shape for o in outputs if o.name == self.output_name)
        if len(out_shape) == 2 and isinstance(out_shape[1], int) and out_shape[1] != len(self.classes):
            raise ModelError(f"{model_path}: {len(self.classes)} class names in the metadata but the model "
                             f"outputs {out_shape[1]} scores")
        try:
            self.fraction = float(meta.get("crop_fraction", "1.0"))  # the evaluation's centre crop
        except ValueError:
            raise ModelError(f"{model_path}: not a kdcompress model (crop_fraction: {meta['crop_fraction']!r})") \
                from None
        if not 0 < self.fraction <= 1:
            raise ModelError(f"{model_path}: not a kdcompress model (crop_fraction {self.fraction} not in (0, 1])")
        batch = next(i.shape for i in inputs if i.name == self.input_name)[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None  # else dynamic

    def preprocess(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W] or [H, W, C] -> float32 [C, H, W], ``(pixels / 255 - mean) / std``."""
        chw = pixels.reshape(self.height, self.width, self.channels).transpose(2, 0, 1)
        return (chw.astype(np.float32) / np.float32(255) - self.mean) / self.std

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities [N, classes] for a pre-processed float32 batch [N, C, H, W]."""
        n = len(x)
        step = self.fixed_batch or max(n, 1)
        parts = []
        for start in range(0, n, step):
            chunk = x[start:start + step]
            if self.fixed_batch and len(chunk) < step:  # a model exported with a fixed batch: pad
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            try:
                logits = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(chunk)})[0]
            except Exception as e:  # onnxruntime's own error types
                first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
                raise ModelError(f"the model failed to run ({first[:200]})") from None
            parts.append(logits[:min(step, n - start)])
        return softmax(np.concatenate(parts)) if parts else np.zeros((0, len(self.classes)))

    def top(self, probs: np.ndarray, top_k: int) -> list[dict]:
        """The ``top_k`` (at most the number of classes) best classes of one probability row."""
        order = np.argsort(-probs, kind="stable")[:top_k]
        return [{"class": self.classes[i], "index": int(i), "prob": float(probs[i])} for i in order]

    def iter_predictions(self, paths: Iterable[str | Path], top_k: int = 1, batch_size: int = 64) -> Iterator[dict]:
        """For each image found in ``paths`` (files or folders), in order, ``{"file", "top"}`` or, for
        one that failed, ``{"file", "error"}``. Reads and runs ``batch_size`` images at a time."""
        if top_k < 1 or batch_size < 1:
            raise ValueError("top_k and batch_size must be >= 1")
        pending: list[dict] = []  # this batch's results, errors included, in input order
        batch: list[np.ndarray] = []
        for path, error in find_images(paths):
            if error is None:
                try:
                    pixels = read_pixels(path, self.channels, (self.width, self.height), self.fraction)
                    batch.append(self.preprocess(pixels))
                except ImageError as e:
                    error = str(e)
            pending.append({"file": path, "error": error} if error else {"file": path})
            if len(batch) == batch_size:
                yield from self._flush(pending, batch, top_k)
                pending, batch = [], []
        yield from self._flush(pending, batch, top_k)

    def _flush(self, pending: list[dict], batch: list[np.ndarray], top_k: int) -> Iterator[dict]:
        probs = iter(self.probabilities(np.stack(batch)) if batch else [])
        for result in pending:
            if "error" not in result:
                result["top"] = self.top(next(probs), top_k)
            yield result

    def predict_files(self, paths: Iterable[str | Path], top_k: int = 1, batch_size: int = 64) -> list[dict]:
        """All of :meth:`iter_predictions` as a list."""
        return list(self.iter_predictions(paths, top_k, batch_size))


def load(model_path: str | Path, threads: int = 0) -> Predictor:
    """A Predictor for a kdcompress ONNX model; ``threads`` 0 lets onnxruntime choose. Raises ModelError."""
    return Predictor(model_path, threads)


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Classify images with a kdcompress ONNX model (needs only numpy, onnxruntime and Pillow). "
                    "Prints one line per image: FILE<tab>CLASS (prob)<tab>... Errors go to stderr; the exit "
                    "code is 1 when any image failed, 2 for a bad model or bad arguments.")
    parser.add_argument("model", help="the .onnx model file (with kdcompress metadata)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image files (any extension) or folders (searched recursively for "
                             f"{' '.join(sorted(IMAGE_EXTENSIONS))})")
    parser.add_argument("--top-k", type=_count(1), default=1,
                        help="classes to print per image (default 1; clamped to the number of classes)")
    parser.add_argument("--json", action="store_true",
                        help='one JSON object per line: {"file": ..., "top": [{"class", "index", "prob"}, ...]}')
    parser.add_argument("--threads", type=_count(0), default=0,
                        help="onnxruntime intra-op threads (default 0: onnxruntime's choice)")
    parser.add_argument("--batch-size", type=_count(1), default=64, help="images per model run (default 64)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed usage/help
        return e.code if isinstance(e.code, int) else 2
    try:
        predictor = load(args.model, args.threads)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    try:
        for result in predictor.iter_predictions(args.inputs, args.top_k, args.batch_size):
            if "error" in result:
                failed += 1
                print(f"error: {result['file']}: {result['error']}", file=sys.stderr, flush=True)
            elif args.json:
                print(json.dumps(result), flush=True)
            else:
                print("\t".join([result["file"], *(f"{t['class']} ({t['prob']:.4f})" for t in result["top"])]),
                      flush=True)
    except ModelError as e:
        print(f"error: {args.model}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early, e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
