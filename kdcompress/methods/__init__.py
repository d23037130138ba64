"""The method registry: ``LOSSES[name]`` is a DistillLoss class (``None`` for ``ce``, the
teacher-free cross-entropy baseline); ``build_loss(name, params)`` checks and builds one.

Each method lives in its own module and names itself (``cls.method``); the registry key is that
name, which is also its ``methods.<name>`` section in params.yaml. Shared pieces: ``schedule``
(temperature schedule, warm-up), ``_features`` (spots, spatial alignment, adapters), ``_params``
(range/choice checks).
"""

from __future__ import annotations

import inspect

from kdcompress.config import check_value
from kdcompress.methods.at import AT
from kdcompress.methods.base import DistillLoss
from kdcompress.methods.cc import CC
from kdcompress.methods.crd import CRD
from kdcompress.methods.data_free import DataFree
from kdcompress.methods.dkd import DKD
from kdcompress.methods.dml import DML
from kdcompress.methods.fitnet import FitNet
from kdcompress.methods.fkd import FocalKD
from kdcompress.methods.fsp import FSP
from kdcompress.methods.ft import FT
from kdcompress.methods.hard_kd import HardKD
from kdcompress.methods.kd import KD
from kdcompress.methods.logit_l2 import LogitL2
from kdcompress.methods.nst import NST
from kdcompress.methods.online_ema import OnlineEMA
from kdcompress.methods.pkt import PKT
from kdcompress.methods.rkd import RKD
from kdcompress.methods.sp import SP
from kdcompress.methods.vid import VID
from kdcompress.types import UserError

_METHODS: tuple[type[DistillLoss], ...] = (
    KD, HardKD, LogitL2, FocalKD, DKD,  # logits
    FitNet, AT, SP, CC, VID, RKD, PKT, FT, FSP, NST, CRD,  # features / embeddings
    DML, OnlineEMA, DataFree,  # teacher-free or data-free
)

LOSSES: dict[str, type[DistillLoss] | None] = {"ce": None, **{cls.method: cls for cls in _METHODS}}


def method_defaults(name: str) -> dict:
    """The hyper-parameters of method ``name`` with their defaults."""
    cls = LOSSES[name]
    if cls is None:
        return {}
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"}


def check_method_params(name: str, params: dict | None) -> dict:
    """Validate ``methods.<name>`` against the method's signature; returns the full kwargs."""
    if name not in LOSSES:
        raise UserError(f"distill.method: unknown method {name!r}; allowed: {', '.join(sorted(LOSSES))}")
    defaults = method_defaults(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise UserError(f"methods.{name}.{unknown[0]}: unknown key; allowed: {', '.join(sorted(defaults)) or 'none'}")
    for key, value in params.items():
        default = defaults[key]
        if default is not None and not isinstance(default, (list, tuple, dict)):
            params[key] = check_value(f"methods.{name}.{key}", value, type(default))
    return {**defaults, **params}


def check_methods(blocks: dict) -> None:
    """Validate every ``methods.<name>`` block of params.yaml, not only the chosen method's: keys,
    types and ranges (by building the method), so a mistake in any block fails now rather than in
    a later experiment."""
    for name, block in blocks.items():
        if name not in LOSSES:
            raise UserError(f"methods.{name}: unknown method; allowed: {', '.join(sorted(LOSSES))}")
        build_loss(name, block)


def build_loss(name: str, params: dict | None = None) -> DistillLoss | None:
    """Build method ``name``; ranges and choices are checked by its ``__init__`` (UserError)."""
    kwargs = check_method_params(name, params)
    cls = LOSSES[name]
    return None if cls is None else cls(**kwargs)
