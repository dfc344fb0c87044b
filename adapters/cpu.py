"""The CPU's feature flags: machines of our kind differ in them (with or without AMX and
AVX512-BF16), and which kernels are fast differs with them."""

from __future__ import annotations

import functools
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first processor's flags in /proc/cpuinfo; empty where there is none (not Linux)."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def has_amx() -> bool:
    """Whether the CPU has AMX's bf16 tile units, on which oneDNN runs bf16 products several times
    faster than float32 ones."""
    return "amx_bf16" in cpu_flags()
