"""Frozen dataclasses, one per params.yaml section, with strict parsing.

Every key is checked: an unknown key, a wrong type, a value out of range or not among the
choices raises ``UserError`` with one line that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdcompress.types import UserError


def _opt(default, *, choices=None, lo=None, hi=None, lo_open=False):
    """A field with validation metadata: choices, or a numeric range [lo, hi] (lo open if asked)."""
    return field(default=default, metadata={"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open})


def check_value(key: str, value: Any, kind: type, meta: dict | None = None) -> Any:
    """Type- and range-check one value; ints are accepted where floats are expected."""
    meta = meta or {}
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise UserError(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise UserError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(str, choices))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise UserError(f"{key}: {value!r} is out of range; allowed: {'>' if meta.get('lo_open') else '>='} {lo}"
                        + (f" and <= {hi}" if hi is not None else ""))
    if hi is not None and value > hi:
        raise UserError(f"{key}: {value!r} is out of range; allowed: <= {hi}")
    return value


def _optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _base_type(hint) -> type:
    """``float`` for ``float | None``; the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # teacher.precision, distill.precision

# keys that moved, with the one line that says where to
MOVED = {"base.precision": "base.precision: moved to teacher.precision and distill.precision (each auto, fp32, bf16 "
                           "or fp16), so teacher and student can train in different precisions"}


def parse_section(cls, name: str, raw: Any):
    """Build dataclass ``cls`` from the mapping ``raw`` of params section ``name``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{name}: expected a mapping of keys, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    moved = [MOVED[f"{name}.{k}"] for k in unknown if f"{name}.{k}" in MOVED]
    if moved:
        raise UserError(moved[0])
    if unknown:
        raise UserError(f"{name}.{unknown[0]}: unknown key; allowed: {', '.join(sorted(fields))}")
    values = {k: v if v is None and _optional(hints[k]) else
              check_value(f"{name}.{k}", v, _base_type(hints[k]), dict(fields[k].metadata)) for k, v in raw.items()}
    return cls(**values)


@dataclass(frozen=True)
class BaseConfig:
    seed: int = _opt(0, lo=0)
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"))
    num_threads: int = _opt(0, lo=0)  # 0: all cores
    nproc: int = _opt(1, lo=1)  # processes per machine for teacher and distill (DDP; NCCL on CUDA, gloo on the CPU)
    nnodes: int = _opt(1, lo=1)  # machines for teacher and distill, each running nproc processes
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous on the first machine; needed (only) when nnodes > 1

    def __post_init__(self):
        if self.nnodes == 1 and self.rdzv_endpoint:
            raise UserError(f"base.rdzv_endpoint: {self.rdzv_endpoint!r} does nothing unless base.nnodes > 1; "
                            "allowed here: '' (the default)")
        if self.nnodes > 1:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UserError(f"base.rdzv_endpoint: {self.rdzv_endpoint!r} is not host:port; allowed: the first "
                                f"machine's address and a free port, e.g. 10.0.0.1:29400 (base.nnodes: {self.nnodes})")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _opt("fashion_mnist", choices=("fashion_mnist", "mnist", "cifar10", "cifar100", "image_folder"))
    root: str = "data"
    val_fraction: float = _opt(0.1, lo=0.0, hi=0.5, lo_open=True)
    image_size: int | None = _opt(None, lo=8)  # resize to this square size; null: as stored (image_folder: 32)
    download: bool = False  # last resort: torchvision's download (needs internet)
    # memory: decoded uint8 splits on the device; stream: an index of the files, decoded on the fly by
    # DataLoader workers; auto: memory when the decoded splits fit memory_budget_gb (image_folder only)
    storage: str = _opt("auto", choices=("auto", "memory", "stream"))
    memory_budget_gb: float = _opt(1.0, lo=0.0, lo_open=True)
    workers: int = _opt(2, lo=0)  # stream: DataLoader worker processes (0: in the main process); prepare's checks
    train_transform: str = _opt("pad_crop_flip", choices=("pad_crop_flip", "random_resized_crop"))
    crop_scale: float = _opt(0.08, lo=0.0, hi=1.0, lo_open=True)  # random_resized_crop: smallest area fraction
    crop_ratio: float = _opt(4 / 3, lo=1.0)  # random_resized_crop: aspect ratios in [1/r, r]
    crop_fraction: float | None = _opt(None, lo=0.0, hi=1.0, lo_open=True)  # eval centre crop; null: auto
    normalize: str = _opt("dataset", choices=("dataset", "imagenet"))  # imagenet: its RGB mean/std
    skip_bad: bool = False  # image_folder: skip unreadable images (counted) instead of failing


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the one training loop, shared by the teacher and distill sections."""

    epochs: int = _opt(10, lo=1)
    batch_size: int = _opt(128, lo=1)
    lr: float = _opt(0.2, lo=0.0, lo_open=True)
    momentum: float = _opt(0.9, lo=0.0, hi=1.0)
    nesterov: bool = True  # Nesterov momentum (when momentum > 0)
    weight_decay: float = _opt(5e-4, lo=0.0)
    label_smoothing: float = _opt(0.0, lo=0.0, hi=1.0)
    lr_schedule: str = _opt("onecycle", choices=("onecycle", "cosine", "constant"))
    crop_padding: int = _opt(2, lo=0)
    hflip: bool = True
    eval_batch_size: int = _opt(1024, lo=1)
    # the forward under autocast (fp16: + GradScaler); auto: runtime.resolve_precision's fixed rule
    precision: str = _opt("fp32", choices=PRECISIONS)


@dataclass(frozen=True)
class TeacherConfig(TrainConfig):
    model: str = "resnet20"
    checkpoint: str = ""  # path to your own weights (a state_dict); empty: train the teacher
    init: str = ""  # weights to start training from (torchvision, timm or kdcompress state_dict); empty: random
    # bf16 on a CPU with native bf16: within seed noise of fp32 on val, 1.6x faster (benchmarks.bf16_teacher)
    precision: str = _opt("auto", choices=PRECISIONS)


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    epochs: int = _opt(20, lo=1)  # 20 against 10: +0.6 val points on the default pair (benchmarks.recipe)
    lr: float = _opt(0.1, lo=0.0, lo_open=True)  # the teacher's 0.2 is too high for the small students
    student: str = "mobilenet:16"
    student_init: str = ""  # weights to start from (torchvision, timm or kdcompress state_dict); empty: random
    method: str = "kd"
    sampling: str = _opt("full", choices=("full", "sakd", "random"))  # random: a seeded sakd.ratio subset
    ce_weight: float | None = _opt(None, lo=0.0)  # null: the method's recipe (0.1/0.9 logit, 1/1 feature)
    kd_weight: float | None = _opt(None, lo=0.0)
    # auto: onnxruntime on CPU for methods that run the teacher forward only, else torch
    teacher_runtime: str = _opt("auto", choices=("auto", "torch", "onnxruntime"))
    teacher_cache: bool = True  # reuse stored teacher logits/embeddings across runs (kdcompress.teacher_cache)
    spots: str = _opt("fixed", choices=("fixed", "adaptive"))  # adaptive: a policy routes each sample's spots


@dataclass(frozen=True)
class RoutingConfig:
    """Spot-adaptive distillation (distill.spots: adaptive; kdcompress.routing)."""

    temperature: float = _opt(5.0, lo=0.0, lo_open=True)  # of the hard Gumbel-softmax
    # the policy's start: distil everywhere, or even odds; auto: distil for a teacher and student of one family
    init: str = _opt("auto", choices=("auto", "distil", "even"))
    classify_weight: float = _opt(2.0, lo=1.0)  # graft CE times this when worse than the student's, / when better
    logit_weight: float = _opt(0.0, lo=0.0)  # logit KD gated by the output spot (0: the method's own terms only)
    logit_temperature: float = _opt(4.0, lo=0.0, lo_open=True)
    lr_scale: float = _opt(0.5, lo=0.0, lo_open=True)  # policy and adapters: distill's lr times this
    weight_decay: float = _opt(1e-3, lo=0.0)


@dataclass(frozen=True)
class SAKDConfig:
    ratio: float = _opt(0.5, lo=0.0, hi=1.0, lo_open=True)
    interval: int = _opt(5, lo=1)
    theta: float = _opt(0.9, lo=0.0, lo_open=True)
    eta: float = _opt(0.5, lo=0.0, hi=1.0)
    momentum: float = _opt(0.1, lo=0.0, hi=1.0)  # the paper's "lambda" (a Python keyword)
    gamma: float = _opt(0.5, lo=0.0, hi=1.0)
    eps: float = _opt(1.0, lo=0.0, lo_open=True)
    sigma: float = _opt(0.1, lo=0.0, lo_open=True)
    shuffle: str = _opt("patch", choices=("pixel", "patch"))
    patch_size: int = _opt(14, lo=1)  # 4x4 patches destroy the teacher signal on 28x28 (measured)
    alpha_rate: str = _opt("beta_raw", choices=("beta_raw", "beta", "one"))  # the rate in the alpha update
    pass_teacher: str = _opt("same", choices=("same", "int8"))  # who runs the difficulty pass
    loss_scale: str = _opt("constant", choices=("paper", "constant"))  # constant: each batch's weights total the base's
    normalise: str = _opt("rank", choices=("minmax", "rank"))  # how the easiness s becomes s_hat in [0, 1]


@dataclass(frozen=True)
class EvaluateConfig:
    ece_bins: int = _opt(15, lo=1)
    batch_size: int = _opt(1024, lo=1)


@dataclass(frozen=True)
class ExportConfig:
    opset: int = _opt(18, lo=13)
    atol: float = _opt(1e-4, lo=0.0, lo_open=True)


@dataclass(frozen=True)
class QuantizeConfig:
    calibration: str = _opt("minmax", choices=("minmax", "entropy", "percentile"))
    samples: int = _opt(512, lo=1)  # seeded sample of training images (never test)
    per_channel: bool = True
    max_drop: float = _opt(0.5, lo=0.0)  # gate: int8 val top-1 at most this many points below fp32
    search: bool = True  # the student's int8: the fastest of a bounded list of configurations that passes the gate
    search_runs: int = _opt(200, lo=10)  # timed batch-1 runs per candidate, at least (blocks of >= 5 ms)
    search_rounds: int = _opt(20, lo=1)  # interleaved blocks of runs per candidate (p50 over all)
    qat_epochs: int = _opt(0, lo=0)  # > 0: also quantization-aware fine-tuning under the distillation loss
    qat_lr: float = _opt(0.005, lo=0.0, lo_open=True)  # its learning rate (cosine over qat_epochs)


@dataclass(frozen=True)
class BenchmarkConfig:
    warmup: int = _opt(50, lo=0)
    runs: int = _opt(300, lo=200)
    rounds: int = _opt(10, lo=1)
    server_batch: int = _opt(64, lo=1)
    server_runs: int = _opt(30, lo=1)


SECTIONS = {
    "base": BaseConfig, "data": DataConfig, "teacher": TeacherConfig, "distill": DistillConfig,
    "sakd": SAKDConfig, "routing": RoutingConfig, "evaluate": EvaluateConfig, "export": ExportConfig,
    "quantize": QuantizeConfig, "benchmark": BenchmarkConfig,
}
FREE_SECTIONS = ("methods",)  # method name -> its hyper-parameters, checked by losses.build_loss


def load_params(path: str | Path) -> dict:
    """Read params.yaml and check every section (so a typo anywhere fails every stage early)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"params file not found: {path}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections")
    unknown = sorted(set(raw) - set(SECTIONS) - set(FREE_SECTIONS))
    if unknown:
        raise UserError(f"{unknown[0]}: unknown params section; allowed: {', '.join([*SECTIONS, *FREE_SECTIONS])}")
    params = {name: parse_section(cls, name, raw.get(name)) for name, cls in SECTIONS.items()}
    methods = raw.get("methods") or {}
    if not isinstance(methods, dict) or not all(isinstance(v, dict) or v is None for v in methods.values()):
        raise UserError("methods: expected a mapping of method name -> mapping of its hyper-parameters")
    params["methods"] = {k: dict(v or {}) for k, v in methods.items()}
    check_modes(params)
    return params


# sections (or keys of a section) that do something only in one mode: (section, keys or None for all, the mode's
# key, the value it needs or a tuple of the values it works with)
SUBSET_KEYS = ("ratio", "interval")  # the sakd keys the random subset reads too
MODES = (
    ("sakd", SUBSET_KEYS, "distill.sampling", ("sakd", "random")),
    ("sakd", tuple(f.name for f in dataclasses.fields(SAKDConfig) if f.name not in SUBSET_KEYS), "distill.sampling",
     "sakd"),
    ("routing", None, "distill.spots", "adaptive"),
    ("data", ("crop_scale", "crop_ratio"), "data.train_transform", "random_resized_crop"),
    ("teacher", (*(f.name for f in dataclasses.fields(TrainConfig) if f.name != "eval_batch_size"), "init"),
     "teacher.checkpoint", ""),
)


def check_modes(params: dict) -> None:
    """A non-default value where it does nothing is refused: ``sakd.*`` needs distill.sampling: sakd
    (``sakd.ratio`` and ``sakd.interval``: sakd or random), ``routing.*`` distill.spots: adaptive, and
    the teacher's training keys an empty teacher.checkpoint."""
    for section, keys, mode, needs in MODES:
        where, key = mode.split(".")
        allowed = needs if isinstance(needs, tuple) else (needs,)
        if getattr(params[where], key) in allowed:
            continue
        default = SECTIONS[section]()
        for name in keys or [f.name for f in dataclasses.fields(default)]:
            if getattr(params[section], name) != getattr(default, name):
                shown = " or ".join("empty" if value == "" else repr(value) for value in allowed)
                raise UserError(f"{section}.{name}: {getattr(params[section], name)!r} does nothing unless {mode} is "
                                f"{shown}; allowed here: {getattr(default, name)!r} (the default)")
