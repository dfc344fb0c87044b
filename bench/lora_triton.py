"""A Triton kernel for the routed LoRA delta of a decode step: one launch per adapted layer.

A bench-only experiment: it lost to the router's torch ops on an H100, where it was aimed, and
left the product (docs/history/triton-lora-kernel.md). bench-gpu's `lora_kernel` experiment
still times it (`routed`), and tests/test_lora_triton.py checks it, so it can be picked up again.

On a GPU a decode step at batch 1 is set by how many kernels it launches and how long each tiny
one takes, not by arithmetic. The torch path costs each adapted layer a matrix product `x·Aᵀ`
that cuBLAS splits over the input width (two kernels for a [1, 4096]·[4096, 16] product, in the
H100 profile) and an `addmm_` for `h·Bᵀ`. Here one kernel does both products for every row:

    program (row, n-block):  h = scale_s · x_row·A_sᵀ  (all R ranks, fp32 accumulation)
                             out[row, n-block] += h·Bᵀ_s[:, n-block]

Each program recomputes h for its row: the A block it reads (R × in) is the same for every
n-block of that row and stays in L2, so the repeat costs cache bandwidth, not launches. That is
what limits the kernel to a few rows (`MAX_ROWS`); wider steps keep the torch products, which
read each A block once.

Same contract as the CPU kernel (`serve/kernels/lora_cpu.cpp`): `lora_add_` returns False for
what it does not take, and the router then runs torch ops that compute the same delta. Compiled
for CUDA tensors. When TRITON_INTERPRET=1 was set before triton was first imported, Triton's
interpreter runs it on CPU tensors instead (how the tests and the CPU bench run it); otherwise
CPU tensors are declined.

The launch shape (`KernelConfig`) was chosen by reasoning and ptxas's register report for sm_90;
bench-gpu times it against `KERNEL_SWEEP`'s other shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bench.routing import restacked
from serve.routing import BASE, LoraRouter, RowPlan

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: without triton the bench leaves the kernel out (`available`)
    triton = tl = None

INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton decides at its first import whether `triton.jit` compiles or interprets (its own library
functions, `tl.sum` among them, are made one way or the other then): read here at the same time."""

MAX_ROWS = 4
"""Rows (batch items × tokens) above which the torch products are used: every row rereads its A block."""


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape. Each program reads its row's whole A block (R × in) and one block of B, so
    more programs per row spread the B reads and the output over more SMs but multiply the A
    reads from L2; `programs_per_row` sets the balance, and BLOCK_N follows from the layer width."""

    block_k: int = 4096
    """Input columns per step of the `x·Aᵀ` loop. Each step waits one trip to L2 and back, and
    there are only a few dozen programs to hide it behind, so few wide steps: a 4096-wide layer's
    whole A block in one (16 warps hold it in about 50 registers a thread, per ptxas for sm_90)."""
    programs_per_row: int = 32
    """About how many output blocks a row's layer is cut into (BLOCK_N: a power of two, 64 to 512)."""
    num_warps: int = 16

    def block_n(self, out: int) -> int:
        return min(512, max(64, _next_power_of_2(_cdiv(out, self.programs_per_row))))


# Plain arithmetic, not triton.cdiv / triton.next_power_of_2: those take about 2 µs a call (they
# are wrapped for use inside kernels too), and a decode step calls this per adapted layer.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


DEFAULT = KernelConfig()


KERNEL_SWEEP = (KernelConfig(block_k=512, num_warps=4), KernelConfig(block_k=1024, num_warps=8),
                KernelConfig(block_k=2048), KernelConfig(programs_per_row=16), KernelConfig(programs_per_row=64))
"""Launch shapes bench-gpu times beside the default (`DEFAULT`): narrower steps of the `x·Aᵀ` loop
with fewer warps, and fewer or more programs per row."""


def available() -> bool:
    return triton is not None


def runs_on(device: torch.device) -> bool:
    """Whether the kernel takes tensors on `device`: compiled for CUDA, or interpreted on the CPU."""
    return available() and (device.type == "cuda" or INTERPRETED)


def _lora_add_kernel(x_ptr, a_ptr, bt_ptr, out_ptr, slot_ptr, scale_ptr, OUT, ROWS_PER_ITEM, SLOT_ROWS,
                     IN: tl.constexpr, R: tl.constexpr, R_POW2: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # IN is a compile-time constant: a model has two or three layer widths (a compile each), and
    # Triton's interpreter cannot loop to a run-time bound under numpy 2.
    row = tl.program_id(0)
    n_block = tl.program_id(1)
    slot = tl.load(slot_ptr + row // ROWS_PER_ITEM)
    live = slot >= 0  # -1: the row uses the base alone; every load and the store are masked off
    s = tl.maximum(slot, 0)
    r = tl.arange(0, R_POW2)
    r_ok = (r < R) & live
    h = tl.zeros([R_POW2], dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < IN
        xk = tl.load(x_ptr + row * IN + k, mask=k_ok & live, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + (s * SLOT_ROWS + r)[:, None] * IN + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        h += tl.sum(a.to(tl.float32) * xk[None, :], axis=1)
    h = h * tl.load(scale_ptr + s)
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < OUT
    b = tl.load(bt_ptr + (s * R + r)[:, None] * OUT + n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    delta = tl.sum(b.to(tl.float32) * h[:, None], axis=0)
    y = tl.load(out_ptr + row * OUT + n, mask=n_ok & live)
    tl.store(out_ptr + row * OUT + n, (y.to(tl.float32) + delta).to(y.dtype), mask=n_ok & live)


@functools.cache
def _kernel():
    """The kernel, compiled on its first launch for each layer width (or interpreted: INTERPRETED)."""
    return triton.jit(_lora_add_kernel)


def lora_add_(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, slots: torch.Tensor,
              scales: torch.Tensor, rank: int, max_rows: int, config: KernelConfig = DEFAULT) -> bool:
    """result[m] += scale_s · (x[m]·A_sᵀ)·Bt_s for every row m whose item's slot s is not -1, in place.

    x: [..., in], result: [..., out], both `rows` rows; A: [slots·R, in], or [slots, R, in] with
    rows of `in` apart and slots further apart (a layer's view into its input group's stack);
    Bt: [slots·R, out], slot s owning rows s·R .. s·R + R; `slots`: int64, one per batch item (rows
    split evenly among them), or one for all; `scales`: float32 per slot. All on one device. False
    (nothing written) for what this does not take: autograd, strided or mismatched tensors, over
    `max_rows` rows."""
    if triton is None or torch.is_grad_enabled():
        return False
    if (x.device.type == "cpu") != INTERPRETED:  # the interpreter takes host tensors only
        return False
    tensors = (result, x, A, Bt, slots, scales)
    if any(t.device != x.device for t in tensors) or not all(t.is_contiguous() for t in tensors if t is not A):
        return False
    slot_rows = _slot_rows(A, rank)
    if slot_rows is None:
        return False
    if not (x.dtype == result.dtype == A.dtype == Bt.dtype) or slots.dtype != torch.int64 or scales.dtype != torch.float32:
        return False
    width, out = A.shape[-1], Bt.shape[1]
    if x.shape[-1] != width or result.shape[-1] != out or slots.numel() == 0:
        return False
    rows = x.numel() // width
    if rows > max_rows or rows == 0 or rows % slots.numel() or result.numel() != rows * out:
        return False
    block_n = config.block_n(out)
    _kernel()[(rows, _cdiv(out, block_n))](
        x, A, Bt, result, slots, scales, out, rows // slots.numel(), slot_rows, IN=width, R=rank,
        R_POW2=_next_power_of_2(rank), BLOCK_K=config.block_k, BLOCK_N=block_n, num_warps=config.num_warps)
    return True


def _slot_rows(A: torch.Tensor, rank: int) -> int | None:
    """Rows of `in` between one slot's first A row and the next's; None for a layout it cannot read."""
    width = A.shape[-1]
    if A.dim() == 2:
        return rank if A.is_contiguous() else None
    if A.dim() == 3 and A.shape[1] == rank and A.stride(2) == 1 and A.stride(1) == width and A.stride(0) % width == 0:
        return A.stride(0) // width
    return None


@contextmanager
def routed(router: LoraRouter, config: KernelConfig = DEFAULT, **settings):
    """`router` adding its deltas with this kernel, in `config`'s launch shape, for steps of up to
    MAX_ROWS rows (torch ops for the rest), restacked as the kernel was served (q/k/v and gate/up
    sharing their stacks, unless `settings` say otherwise; `bench.routing.restacked`) and as it
    was afterwards. Yields the kernel's answers, one per call (True: taken). Nothing may rebuild
    the router meanwhile (a new resident adapter would): a rebuild sets its own kernel again.

    On a GPU the rows' slots are copied into one buffer on the device each time they are set:
    the kernel reads them there, and a captured step finds the next rows' slots where it saw them."""
    answers: list[bool] = []

    def lora_add(*args) -> bool:
        answers.append(lora_add_(*args, config=config))
        return answers[-1]

    with restacked(router, **{"kernel": "torch", **settings}):
        router.lora_add, router.kernel_rows = lora_add, MAX_ROWS
        device = _layers_device(router)
        if device.type != "cpu":
            router.set_rows = _indices_on_device(router, device)
        try:
            yield answers
        finally:
            router.__dict__.pop("set_rows", None)


def _layers_device(router: LoraRouter) -> torch.device:
    """Where the adapted layers are (and with them the stacks the kernel reads)."""
    layers = router.layers()
    return layers[0].get_base_layer().weight.device if layers else torch.device("cpu")


def _indices_on_device(router: LoraRouter, device: torch.device):
    """`router.set_rows`, then its plan's `item_indices` copied into a fixed buffer on `device`."""
    buffer = torch.full((MAX_ROWS,), BASE, dtype=torch.long, device=device)
    set_rows = router.set_rows  # the class's, bound: called before this replaces it

    def set_rows_on_device(keys, replayed: bool = False) -> RowPlan:
        plan = set_rows(keys, replayed)
        indices = plan.item_indices
        if len(indices) <= MAX_ROWS:
            router.plan = dataclasses.replace(plan, item_indices=buffer[: len(indices)].copy_(indices, non_blocking=True))
        return router.plan

    return set_rows_on_device
