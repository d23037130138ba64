"""Range and choice checks for method hyper-parameters (types are checked by ``build_loss``).

Each failure is one ``UserError`` line naming ``methods.<method>.<key>`` and what is allowed; the
wording is ``kdcompress.config.check_value``'s, so params errors read the same everywhere.
"""

from __future__ import annotations

from typing import Any

from kdcompress.config import check_value


def check_param(method: str, key: str, value: Any, *, choices=None, lo=None, hi=None, lo_open: bool = False) -> Any:
    """Check ``value`` of ``methods.<method>.<key>`` against choices or the range [lo, hi]."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    return check_value(f"methods.{method}.{key}", value, type(value), meta)


def positive(method: str, key: str, value: float) -> float:
    return check_param(method, key, value, lo=0.0, lo_open=True)


def non_negative(method: str, key: str, value: float) -> float:
    return check_param(method, key, value, lo=0.0)
