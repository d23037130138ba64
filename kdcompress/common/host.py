"""The CPU a figure was measured on: its name and the instruction-set extensions that decide int8 and
bf16 speed (VNNI dot products, native bf16, AMX; on ARM the dot-product and matrix extensions). One
host name can hide different CPUs: a cloud "AMD EPYC" has been AVX-512 VNNI/BF16 one day and AVX2 only
the next, and onnxruntime's int8 kernels and torch's bf16 differ between them."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

# /proc/cpuinfo flag names (x86 "flags", ARM "Features") that change int8 or bf16 kernels.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                  "asimddp", "i8mm", "bf16")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


@cache
def cpu_flags() -> tuple[str, ...]:
    """The RELEVANT_FLAGS this CPU has, in RELEVANT_FLAGS' order (empty where /proc/cpuinfo is missing)."""
    for line in _cpuinfo():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            have = set(value.split())
            return tuple(f for f in RELEVANT_FLAGS if f in have)
    return ()


def native_bf16() -> bool:
    """Whether the CPU computes bf16 dot products natively (not emulated through fp32)."""
    return any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16", "bf16"))


@cache
def cpu_name() -> str:
    """The CPU's model name and its relevant flags, e.g. ``AMD EPYC (avx2)``."""
    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    name = name or platform.processor() or platform.machine()
    flags = cpu_flags()
    return f"{name} ({', '.join(flags)})" if flags else name
