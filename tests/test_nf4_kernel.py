"""The fused NF4 kernel (bench/nf4_kernel.py): tests/nf4_kernel_checks.py in a process of its own,
and the kernel compiled for the H100 with no GPU needed."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    run_triton_checks(request, tmp_path, "nf4_kernel_checks.py")


COMPILE_FOR_HOPPER = """
import json, pathlib, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bench import nf4_kernel

ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
folder = pathlib.Path(tempfile.mkdtemp())
signature = {"x_ptr": "*bf16", "w_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "absmax2_ptr": "*fp32",
             "code2_ptr": "*fp32", "offset_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32"}
pointers = [name for name, kind in signature.items() if kind.startswith("*")]
empty = torch.empty(0)
found = []
configs = (nf4_kernel.DEFAULT, *nf4_kernel.KERNEL_SWEEP)
cases = [(width, out, config, rows, torch.bfloat16)
         for width, out in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))  # Llama-3.1-8B's layers
         for config in (configs if width == out else (nf4_kernel.DEFAULT,)) for rows in (1, 16)]
cases.append((4096, 4096, nf4_kernel.DEFAULT, 16, torch.float32))  # IEEE float32 products, as the GPU checks run
for width, out, config, rows, dtype in cases:
    layout = nf4_kernel.NF4Layout(packed=empty, out_features=out, in_features=width, code=empty, blocksize=64,
                                  absmax=empty, nested_absmax=empty, nested_code=empty, nested_blocksize=256)
    launch = nf4_kernel.plan_launch(rows, layout, dtype, False, config)
    floats = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    signature.update(x_ptr=floats, bias_ptr=floats, y_ptr=floats)
    # what the launcher specializes on at run time: torch's allocations are 16-byte
    # aligned, and every output width of the 8B shape is a multiple of 16
    names = list(signature) + list(launch.constants)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in (*pointers, "N")}
    source = ASTSource(nf4_kernel.triton_kernel(), {**signature, **{k: "constexpr" for k in launch.constants}},
                       launch.constants, attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch.options)
    ptx = folder / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    report = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(folder / "kernel.cubin")],
                            capture_output=True, text=True, check=True).stderr
    found.append({"config": repr(config), "width": width, "out": out, "rows": rows, "dtype": str(dtype),
                  "cubin_bytes": len(kernel.asm["cubin"]),
                  "spills": "0 bytes spill stores, 0 bytes spill loads" not in report})
print(json.dumps(found))
"""


@pytest.mark.slow
def test_compiles_for_the_h100_without_spilling(tmp_path):
    """The interpreter takes kernels the compiler would refuse; this compiles the real kernel for
    sm_90 (the H100 and H200) with Triton's own ptxas, no GPU needed, for bf16 decode steps of 1
    and 16 rows on the 8B shape's layers, every launch shape bench/nf4_decode.py sweeps on one of
    them, and float32 as the GPU checks run it: each must produce a cubin, and every bf16 one keep
    its registers (a spill would put the tile through local memory)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    from bench import nf4_kernel

    assert len(found) == 2 * (1 + len(nf4_kernel.KERNEL_SWEEP) + 3) + 1
    assert all(k["cubin_bytes"] > 0 for k in found)
    # float32 tiles take twice the registers and spill some: that path serves the checks, not decoding
    decoding = [k for k in found if k["dtype"] == "torch.bfloat16"]
    assert decoding and not any(k["spills"] for k in decoding), [k for k in decoding if k["spills"]]


def test_the_bench_refuses_to_run_without_cuda(monkeypatch):
    from bench import nf4_decode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs CUDA"):
        nf4_decode.require_cuda()

