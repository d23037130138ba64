"""The method registry: ``LOSSES[name]`` is a DistillLoss class (``None`` for ``ce``, the
teacher-free cross-entropy baseline); ``build_loss(name, params)`` checks and builds one."""

from __future__ import annotations

import inspect

from kdcompress.config import check_value
from kdcompress.losses.base import DistillLoss
from kdcompress.losses.kd import KD
from kdcompress.types import UserError

LOSSES: dict[str, type[DistillLoss] | None] = {
    "ce": None,
    "kd": KD,
}


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


def build_loss(name: str, params: dict | None = None) -> DistillLoss | None:
    kwargs = check_method_params(name, params)
    cls = LOSSES[name]
    return None if cls is None else cls(**kwargs)
