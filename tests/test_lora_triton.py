"""The Triton LoRA kernel (bench/lora_triton.py): tests/lora_triton_checks.py in a process of its
own, and the kernel compiled for the H100 with no GPU needed."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_triton_checks

if sys.platform == "linux" and platform.machine() == "x86_64":
    import triton  # noqa: F401  the dev extras install it here: missing is a failure, not a skip
else:
    pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_kernel_checks_pass_in_a_process_of_their_own(request, tmp_path):
    """Without a GPU, under Triton's interpreter, in a process started with TRITON_INTERPRET=1
    (`run_triton_checks` says why a process of its own)."""
    run_triton_checks(request, tmp_path, "lora_triton_checks.py")


COMPILE_FOR_HOPPER = """
import json, pathlib, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bench import lora_triton

ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
folder = pathlib.Path(tempfile.mkdtemp())
pointers = {name: "*bf16" for name in ("x_ptr", "a_ptr", "bt_ptr", "out_ptr")}
signature = {**pointers, "slot_ptr": "*i64", "scale_ptr": "*fp32", "OUT": "i32", "ROWS_PER_ITEM": "i32", "SLOT_ROWS": "i32",
             **{name: "constexpr" for name in ("IN", "R", "R_POW2", "BLOCK_K", "BLOCK_N")}}
# What Triton's launcher specializes on for these shapes at run time: torch's allocations are
# 16-byte aligned, and OUT and SLOT_ROWS (R = 16 times the group's members) are multiples of 16.
names = list(signature)
attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in (*pointers, "slot_ptr", "scale_ptr", "OUT", "SLOT_ROWS")}
found = []
for config in (lora_triton.DEFAULT, *lora_triton.KERNEL_SWEEP):
    for width, out in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)):  # Llama-3.1-8B's layers
        constants = {"IN": width, "R": 16, "R_POW2": 16, "BLOCK_K": config.block_k, "BLOCK_N": config.block_n(out)}
        kernel = triton.compile(ASTSource(triton.jit(lora_triton._lora_add_kernel), signature, constants, attrs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})
        ptx = folder / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(folder / "kernel.cubin")],
                                capture_output=True, text=True, check=True).stderr
        found.append({"config": repr(config), "width": width, "out": out, "cubin_bytes": len(kernel.asm["cubin"]),
                      "spills": "0 bytes spill stores, 0 bytes spill loads" not in report})
print(json.dumps(found))
"""


@pytest.mark.slow
def test_compiles_for_the_h100_without_spilling(tmp_path):
    """The interpreter takes kernels the compiler would refuse; this compiles the real kernel for
    sm_90 (the H100 and H200) with Triton's own ptxas, no GPU needed, for every launch shape the
    router and bench-gpu use on the 8B shape's layers, specialized as the launcher would for them:
    each must produce a cubin and keep its registers (a spill would put the tile through local
    memory)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert len(found) == 6 * 4
    assert all(k["cubin_bytes"] > 0 and not k["spills"] for k in found), found
