"""A fused CPU kernel for the routed LoRA delta (`lora_cpu.cpp`), built on first use with torch's
C++ extension tool and cached; `make setup` builds it ahead (`python -m serve.kernels`).

Optional by design: without a C++ compiler, or with LORASWAP_CPU_KERNEL=0, `load()` returns None
and the router uses plain torch ops, which compute the same delta.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.cpp")


def _cpu_tag() -> str:
    """The build uses -march=native, so a cached build is only reused on the same kind of CPU."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def _find_ninja() -> None:
    """torch's builder runs `ninja` from PATH; the pip package's copy lives in the environment,
    which is not on PATH when the interpreter is called by its path (`.venv/bin/python`)."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module, or None when it is disabled or cannot be built."""
    if os.environ.get("LORASWAP_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as build

        _find_ninja()
        return build(name=f"loraswap_lora_cpu_{_cpu_tag()}", sources=[str(SOURCE)],
                     extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
    except Exception as err:  # no compiler, no ninja, a failed build: torch ops do the same work
        log.warning("fused CPU LoRA kernel unavailable (%s); using torch ops", str(err).splitlines()[0] if str(err) else err)
        return None
