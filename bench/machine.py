"""What machine a bench ran on, in its results: machines of our kind differ in their CPU (with or
without AMX and AVX512-BF16), and the figures with them."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from adapters.cpu import cpu_flags

CPU_FEATURES = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}
"""/proc/cpuinfo flags that change which kernels are fast, and how results name them."""


def cpu_model() -> str:
    """The CPU's model name and its bf16 features, from /proc/cpuinfo (the platform's name where there is none)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = info.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor() or platform.machine())
    features = [name for flag, name in CPU_FEATURES.items() if flag in cpu_flags()] or ["no AMX, no AVX512-BF16"]
    return f"{model} ({', '.join(features)})"


def describe() -> str:
    """The GPU's name, or the CPU's model, its bf16 features and the threads torch uses."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"
