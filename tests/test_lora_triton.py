"""The Triton LoRA kernel (`serve/kernels/lora_triton.py`) against a float64 reference.

With no GPU here it runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1 before
triton is imported), which executes the same kernel source program by program on CPU tensors: the
indexing, masking, slot routing and accumulation are what is checked, not speed (bench-gpu times
it on a GPU).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if sys.platform == "linux" and platform.machine() == "x86_64":
    import triton  # noqa: F401  the dev extras install it here: missing is a failure, not a skip
else:
    pytest.importorskip("triton")

from serve.kernels import lora_triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cpu" if lora_triton.INTERPRETED else "cuda"
"""Interpreted on the CPU here; compiled on a GPU machine (bench/on_gpu_machine.sh with TESTS=1)."""
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="triton was imported before TRITON_INTERPRET=1 was set, and there is no GPU")


def reference(result, x, A_rows, Bt, item_slots, scales, rank):
    """float64: result[m] + scale_s·(x[m]·A_sᵀ)·Bt_s, A_rows(s) giving slot s's [R, in] block."""
    out = result.double().clone().view(-1, result.shape[-1])
    x2 = x.double().reshape(-1, x.shape[-1])
    per_item = x2.shape[0] // item_slots.numel()
    for m in range(x2.shape[0]):
        s = int(item_slots[m // per_item])
        if s >= 0:
            h = x2[m] @ A_rows(s).double().t() * float(scales[s])
            out[m] += h @ Bt[s * rank : (s + 1) * rank].double()
    return out.view_as(result)


def relative_error(got, want) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def stacks(slots: int, rank: int, width: int, out: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(slots * rank, width, generator=g).to(dtype)
    Bt = torch.randn(slots * rank, out, generator=g).to(dtype)
    return on_device(A, Bt, torch.rand(slots, generator=g) * 2 + 0.25)


CASES = {  # (rows shape, the items' slots): -1 is a row on the base
    "one-row": ((1, 1), [1]),
    "four-rows-mixed": ((4, 1), [2, -1, 0, 1]),
    "one-slot-for-all": ((3, 1), [2]),
    "two-tokens-per-item": ((2, 2), [0, 2]),
}


CONFIGS = {"default": lora_triton.DEFAULT,  # one partial step of x·Aᵀ here
           "small-blocks": lora_triton.KernelConfig(block_k=64, programs_per_row=2, num_warps=2)}  # four steps


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(case, dtype, tolerance, config):
    # rank 6 pads to 8 lanes; widths off every block size leave partial blocks in both loops
    (batch, seq), item_slots = CASES[case]
    rank, width, out = 6, 200, 300
    A, Bt, scales = stacks(3, rank, width, out, dtype, seed=len(case))
    g = torch.Generator().manual_seed(7)
    x, result, slots = on_device(torch.randn(batch, seq, width, generator=g).to(dtype),
                                 torch.randn(batch, seq, out, generator=g).to(dtype), torch.tensor(item_slots))
    want = reference(result, x, lambda s: A[s * rank : (s + 1) * rank], Bt, slots, scales, rank)
    got = result.clone()
    with torch.no_grad():
        assert lora_triton.lora_add_(got, x, A, Bt, slots, scales, rank, max_rows=4, config=CONFIGS[config])
    assert relative_error(got, want) < tolerance
    per_item = batch * seq // len(item_slots)
    for item, slot in enumerate(item_slots):  # base rows: not a bit changed
        rows = slice(item * per_item, (item + 1) * per_item)
        if slot < 0:
            assert torch.equal(got.view(-1, out)[rows], result.view(-1, out)[rows])
        else:
            assert not torch.equal(got.view(-1, out)[rows], result.view(-1, out)[rows])


def test_launch_arithmetic_matches_tritons_own():
    import triton

    for n in range(1, 20000, 7):
        assert lora_triton._next_power_of_2(n) == triton.next_power_of_2(n)
        assert all(lora_triton._cdiv(n, d) == triton.cdiv(n, d) for d in (1, 3, 16, 64, 128, 512))


def test_reads_a_layer_view_into_a_group_stack():
    # An input group's stack is [slots, members, R, in]; member 1 of 3 reads every third block.
    slots, members, rank, width, out = 3, 3, 4, 96, 130
    (group,) = on_device(torch.randn(slots * members * rank, width))
    A = group.view(slots, members, rank, width)[:, 1]  # [slots, R, in], slots M·R rows apart
    _, Bt, scales = stacks(slots, rank, width, out, torch.float32, seed=3)
    x, result, item_slots = on_device(torch.randn(2, 1, width), torch.randn(2, 1, out), torch.tensor([2, 0]))
    want = reference(result, x, lambda s: A[s], Bt, item_slots, scales, rank)
    got = result.clone()
    with torch.no_grad():
        assert lora_triton.lora_add_(got, x, A, Bt, item_slots, scales, rank, max_rows=4)
    assert relative_error(got, want) < 1e-5


def declined(result, *args) -> bool:
    before = result.clone()
    if lora_triton.lora_add_(result, *args):
        return False
    assert torch.equal(result, before), "a declined call wrote its output"
    return True


def test_declines_what_it_does_not_take(monkeypatch):
    rank, width, out = 4, 64, 80
    A, Bt, scales = stacks(2, rank, width, out, torch.float32, seed=5)
    x, result, slots = on_device(torch.randn(4, 1, width), torch.randn(4, 1, out), torch.tensor([0, 1, -1, 0]))
    args = (A, Bt, slots, scales, rank)
    with torch.no_grad():
        assert declined(result, x, *args, 3)  # more rows than max_rows
        assert declined(result, x.bfloat16(), *args, 4)  # dtypes differ
        assert declined(result, x.repeat(1, 1, 2)[..., :width], *args, 4)  # strided rows
        assert declined(result, x, A, Bt, slots.int(), scales, rank, 4)  # int32 slots
        assert declined(result, x, A, Bt, slots[:0], scales, rank, 4)  # no items
        assert declined(result, x.view(2, 1, 2 * width), *args, 4)  # rows of another width
        assert declined(result, x, A.t().contiguous().t(), Bt, slots, scales, rank, 4)  # A column-major
        assert declined(result, x, A, Bt, slots.to("meta"), scales, rank, 4)  # tensors on two devices
        monkeypatch.setattr(lora_triton, "INTERPRETED", not lora_triton.INTERPRETED)  # the other kind of tensor
        assert declined(result, x, *args, 4)
        monkeypatch.undo()
        assert not declined(result.clone(), x, *args, 4)  # the same call is taken
    assert declined(result, x, *args, 4)  # autograd on: torch ops record the graph


COMPILE_FOR_HOPPER = """
import json, pathlib, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bench.gpu import KERNEL_SWEEP
from serve.kernels import lora_triton

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
for config in (lora_triton.DEFAULT, *KERNEL_SWEEP):
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
