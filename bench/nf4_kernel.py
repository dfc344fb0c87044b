"""A fused NF4 matrix product for small batches: y = x·Wᵀ read straight from bitsandbytes' 4-bit layout.

An experiment for decode steps on a GPU (issue 25, item 4; docs/history/nf4-kernel.md). Nothing in
the server calls it yet: `bench/nf4_decode.py` times it against bitsandbytes' own path, and
tests/test_nf4_kernel.py checks it against bitsandbytes' dequantization under Triton's interpreter.

bitsandbytes' `Linear4bit` keeps W [out, in] as NF4 codes, two to a byte, in W's row-major order
(the even element in the high nibble), one float32 `absmax` per `blocksize` consecutive elements,
and with double quantization those absmax values themselves 8-bit: `code2[absmax8[b]] ·
absmax2[b // blocksize2] + offset`. Each program here computes a [rows, BLOCK_N] tile of y and walks
the input width in BLOCK_K steps; each step loads BLOCK_N × BLOCK_K/2 packed bytes and the tile's
scales, turns them into weights in registers, and multiplies them with the rows of x on the tensor
cores (fp32 accumulation). No dequantized weight is written to memory, so a step reads each weight
as its 4 bits and a little more for the scales, the traffic a memory-bound decode step is bounded by.

Bytes hold the element pairs (2j, 2j+1) of a row, so instead of interleaving the two nibbles back
into one tile, the kernel splits x: the high nibbles meet x's even columns and the low nibbles its
odd ones, two products that add to the whole.

Compiled for CUDA tensors. When TRITON_INTERPRET=1 was set before triton was first imported,
Triton's interpreter runs it on CPU tensors instead (how the tests run it); otherwise a CPU tensor
is refused with a message saying so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: `available()` says so, and nf4_matmul refuses to run
    triton = tl = None

INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Triton decides at its first import whether `triton.jit` compiles or interprets: read at the same time."""

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape. A decode step's rows are few, so each program takes all of them (up to
    BLOCK_M = 16, the tensor cores' narrowest tile) and the output width is what is spread over
    the GPU: narrow BLOCK_N tiles give a 4096-wide layer enough programs to keep every SM's
    loads in flight, and `split_k` cuts the input width too for narrow layers (k/v at 1024)."""

    block_n: int = 32
    """Output features per program (a power of two, at least 16)."""
    block_k: int = 256
    """Input columns per step of the loop over the input width (a power of two, at least 32)."""
    split_k: int = 1
    """Programs sharing one output tile, each over its own slice of the input width; their float32
    partial sums are added in a fixed order afterwards (one more small kernel), never atomically,
    so a result does not depend on which program finished first."""
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name, low in (("block_n", 16), ("block_k", 32)):
            value = getattr(self, name)
            if value < low or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two of at least {low}, got {value}")
        if self.split_k < 1 or self.num_warps < 1:
            raise ValueError(f"KernelConfig.split_k and num_warps must be positive, got {self.split_k}, {self.num_warps}")


DEFAULT = KernelConfig()
"""Chosen by reasoning (enough programs for a 4096-wide layer's loads to keep a large GPU's memory
busy) and ptxas's register report for sm_90 (no spills), not by a measurement: bench/nf4_decode.py
times KERNEL_SWEEP's shapes beside it."""

KERNEL_SWEEP = (KernelConfig(block_n=16), KernelConfig(block_n=64, block_k=128), KernelConfig(split_k=2),
                KernelConfig(split_k=4), KernelConfig(block_k=512, num_warps=8))
"""Launch shapes bench/nf4_decode.py times beside the default: narrower and wider output tiles,
the input width split two and four ways (more programs for narrow layers), longer steps."""

MAX_BLOCK_M = 16
"""Rows one program takes at most; more rows get more programs, each reading the weight again."""


@dataclass(frozen=True)
class NF4Layout:
    """What the kernel reads of one bitsandbytes 4-bit weight: the packed codes as bytes and the
    scales, nested or not, with the shape they describe."""

    packed: torch.Tensor  # uint8 [(out·in)/2]
    out_features: int
    in_features: int
    code: torch.Tensor  # float32 [16]: the NF4 values
    blocksize: int
    absmax: torch.Tensor  # float32 [blocks], or uint8 [blocks] when nested
    nested_absmax: torch.Tensor | None = None  # float32 [blocks / blocksize2]
    nested_code: torch.Tensor | None = None  # float32 [256]
    nested_blocksize: int = 1
    offset: torch.Tensor | None = None  # float32 [1]: the mean absmax subtracted before nesting

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def available() -> bool:
    return triton is not None


def runs_on(device: torch.device) -> bool:
    """Whether the kernel takes tensors on `device`: compiled for CUDA, or interpreted on the CPU."""
    return available() and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))


def nf4_layout(weight: torch.Tensor) -> NF4Layout:
    """The layout of `weight`, a bitsandbytes `Params4bit` (a `Linear4bit`'s `.weight`) quantized
    as NF4; ValueError naming what does not fit: no quant_state, another 4-bit type, the CPU's
    repacked format, an input width that is not a multiple of the block size."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError(f"nf4_matmul: the weight {tuple(weight.shape)} has no quant_state: not a bitsandbytes 4-bit weight")
    if state.quant_type != "nf4":
        raise ValueError(f"nf4_matmul: quant_type {state.quant_type!r}, expected 'nf4'")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("nf4_matmul: the weight was repacked for bitsandbytes' AVX512 CPU kernel, another layout "
                         "(adapters.base.use_exact_4bit_kernels keeps layers out of it)")
    if len(state.shape) != 2:
        raise ValueError(f"nf4_matmul: quant_state.shape {tuple(state.shape)} is not [out, in]")
    out_features, in_features = (int(d) for d in state.shape)
    if in_features % state.blocksize:
        raise ValueError(f"nf4_matmul: input width {in_features} is not a multiple of the block size {state.blocksize}")
    packed = weight.data.reshape(-1).view(torch.uint8)  # any quant_storage dtype holds the same bytes
    if packed.numel() != out_features * in_features // 2:
        raise ValueError(f"nf4_matmul: {packed.numel()} packed bytes for a [{out_features}, {in_features}] weight")
    common = dict(packed=packed, out_features=out_features, in_features=in_features,
                  code=state.code.float(), blocksize=int(state.blocksize))
    if not state.nested:
        return NF4Layout(absmax=state.absmax.float(), **common)
    inner = state.state2
    return NF4Layout(absmax=state.absmax, nested_absmax=inner.absmax.float(), nested_code=inner.code.float(),
                     nested_blocksize=int(inner.blocksize), offset=state.offset.float().reshape(1), **common)


def nf4_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               config: KernelConfig = DEFAULT) -> torch.Tensor:
    """x·Wᵀ (+ bias) for x [..., in] in a compute dtype (float32, bfloat16, float16) and `weight`
    a bitsandbytes NF4 `Params4bit` holding W [out, in]; returns [..., out] in x's dtype.

    Each weight is dequantized in registers to the bit as bitsandbytes' `dequantize_4bit` makes
    it (code · absmax in float32, then rounded to x's dtype), and the products accumulate in
    float32. x, the weight and its quant_state on one device: CUDA, or the CPU under
    TRITON_INTERPRET=1. Not for autograd: nothing records a graph (bitsandbytes' own path trains)."""
    layout = nf4_layout(weight)
    _check_input(x, layout, bias)
    rows = x.numel() // layout.in_features
    if rows == 0:
        return x.new_empty(*x.shape[:-1], layout.out_features)
    x2 = x.reshape(rows, layout.in_features).contiguous()  # [rows, in]
    y = _launch(x2, layout, bias, config)  # [rows, out]
    return y.view(*x.shape[:-1], layout.out_features)


def nf4_linear(layer: torch.nn.Module, x: torch.Tensor, config: KernelConfig = DEFAULT) -> torch.Tensor:
    """What `layer` (a bitsandbytes `Linear4bit` with NF4 weights) returns for x, through the kernel:
    x in the layer's compute dtype, its bias added, the result in x's dtype."""
    compute = layer.compute_dtype if getattr(layer, "compute_dtype", None) is not None else x.dtype
    bias = None if layer.bias is None else layer.bias.to(compute)
    return nf4_matmul(x.to(compute), layer.weight, bias, config).to(x.dtype)


def _check_input(x: torch.Tensor, layout: NF4Layout, bias: torch.Tensor | None) -> None:
    if triton is None:
        raise RuntimeError("nf4_matmul needs triton, which is not installed")
    if not runs_on(x.device):
        raise RuntimeError(f"nf4_matmul runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set "
                           f"before triton was imported; got a tensor on {x.device}")
    if x.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"nf4_matmul: x is {x.dtype}; expected one of {COMPUTE_DTYPES}")
    if x.dim() == 0 or x.shape[-1] != layout.in_features:
        raise ValueError(f"nf4_matmul: x {tuple(x.shape)} does not end in the weight's input width {layout.in_features}")
    nested = [layout.nested_absmax, layout.nested_code, layout.offset] if layout.nested else []
    tensors = [layout.packed, layout.absmax, layout.code, *nested]
    if bias is not None:
        if bias.shape != (layout.out_features,) or bias.dtype != x.dtype:
            raise ValueError(f"nf4_matmul: bias {tuple(bias.shape)} {bias.dtype}, "
                             f"expected ({layout.out_features},) {x.dtype}")
        tensors.append(bias)
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"nf4_matmul: x is on {x.device} but the weight, its quant_state or the bias is not")
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("nf4_matmul does not record autograd: call it under torch.no_grad()")


@dataclass(frozen=True)
class Launch:
    """One launch's grid and compile-time constants, from the shapes alone: what `nf4_matmul`
    launches, and what an ahead-of-time compile for another GPU must specialize on."""

    grid: tuple[int, int, int]  # (output tiles, row tiles, splits of the input width)
    constants: dict
    options: dict  # Triton's launch options


def plan_launch(rows: int, layout: NF4Layout, dtype: torch.dtype, has_bias: bool,
                config: KernelConfig = DEFAULT) -> Launch:
    """The launch for `rows` rows of x in `dtype` through `layout`'s weight."""
    n, k = layout.out_features, layout.in_features
    block_m = min(MAX_BLOCK_M, max(16, _next_power_of_2(rows)))
    split = max(1, min(config.split_k, _cdiv(k, config.block_k)))
    k_per_split = _cdiv(_cdiv(k, split), config.block_k) * config.block_k  # whole steps: only the last split runs past K
    constants = dict(
        K=k, BLOCKSIZE=layout.blocksize, BLOCKSIZE2=layout.nested_blocksize, NESTED=layout.nested,
        HAS_BIAS=has_bias and split == 1,  # split partial sums get the bias once, after they are added
        K_PER_SPLIT=k_per_split, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        # The interpreter multiplies bf16 as raw 16-bit integers (numpy has no bf16): products there
        # run on float32 copies, exact for bf16 and fp16 operands. On a GPU fp32 inputs ask for
        # IEEE products, never TF32's 10-bit mantissas.
        DOT_FP32=INTERPRETED or dtype == torch.float32,
        BF16_BY_HAND=INTERPRETED and dtype == torch.bfloat16)
    # No fused multiply-adds: `code2 · absmax2 + offset` rounds twice, as bitsandbytes' own
    # separate operations do, so each weight is bitsandbytes' to the bit (the products run on the
    # tensor cores either way).
    options = {"num_warps": config.num_warps, "enable_fp_fusion": False}
    return Launch((_cdiv(n, config.block_n), _cdiv(rows, block_m), split), constants, options)


def _launch(x: torch.Tensor, layout: NF4Layout, bias: torch.Tensor | None, config: KernelConfig) -> torch.Tensor:
    """y [rows, out] for x [rows, in], contiguous."""
    rows, n = x.shape[0], layout.out_features
    launch = plan_launch(rows, layout, x.dtype, bias is not None, config)
    split = launch.grid[2]
    fused = split == 1  # one program per tile: it adds the bias and rounds to x's dtype itself
    y = torch.empty(split, rows, n, dtype=x.dtype if fused else torch.float32, device=x.device)  # [split, rows, out]
    nested = layout.nested
    triton_kernel()[launch.grid](
        x, layout.packed, layout.absmax, layout.code,
        layout.nested_absmax if nested else layout.absmax, layout.nested_code if nested else layout.code,
        layout.offset if nested else layout.code, bias if launch.constants["HAS_BIAS"] else x, y, rows, n,
        **launch.constants, **launch.options)
    if fused:
        return y[0]
    out = y.sum(0)  # [rows, out], the partial sums added in split order
    if bias is not None:
        out += bias
    return out.to(x.dtype)


def _jit(fn):
    """triton.jit where triton is installed; without it the kernel is never launched (`available`)."""
    return fn if triton is None else triton.jit(fn)


# Plain arithmetic, not triton.cdiv / next_power_of_2, which are slow wrapped jit functions (bench/lora_triton.py).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@_jit
def _nf4_matmul_kernel(x_ptr, w_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, y_ptr, M, N,
                       K: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       HAS_BIAS: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                       BF16_BY_HAND: tl.constexpr):
    # K is a compile-time constant: a model has a few layer widths (a compile each), and Triton's
    # interpreter cannot loop to a run-time bound under numpy 2.
    HALF: tl.constexpr = BLOCK_K // 2
    # The tile's scales: GROUPS per row per step, each covering GROUP columns (GROUP // 2 bytes).
    GROUP: tl.constexpr = BLOCKSIZE if BLOCKSIZE < BLOCK_K else BLOCK_K
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of x
    split = tl.program_id(2)
    n_ok, m_ok = n < N, m < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = split * K_PER_SPLIT + step
        j = k0 // 2 + tl.arange(0, HALF)  # byte j of a row holds its elements 2j (high nibble) and 2j + 1
        j_ok = j < K // 2
        packed = tl.load(w_ptr + n[:, None] * (K // 2) + j[None, :], mask=n_ok[:, None] & j_ok[None, :], other=0)
        g = tl.arange(0, GROUPS)
        block = (n[:, None] * K + k0) // BLOCKSIZE + g[None, :] * GROUP // BLOCKSIZE  # [BLOCK_N, GROUPS]
        g_ok = n_ok[:, None] & (k0 + g[None, :] * GROUP < K)
        scale = _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, g_ok, BLOCKSIZE2, NESTED)
        w_hi = _dequantize(code_ptr, packed >> 4, scale, BLOCK_N, GROUPS, GROUP, HALF)  # [BLOCK_N, HALF]: columns 2j
        w_lo = _dequantize(code_ptr, packed & 0xF, scale, BLOCK_N, GROUPS, GROUP, HALF)  # columns 2j + 1
        x_ok = m_ok[:, None] & j_ok[None, :]
        x_even = tl.load(x_ptr + m[:, None] * K + 2 * j[None, :], mask=x_ok, other=0.0)  # [BLOCK_M, HALF]
        x_odd = tl.load(x_ptr + m[:, None] * K + 2 * j[None, :] + 1, mask=x_ok, other=0.0)
        acc = _dot(x_even, w_hi, acc, DOT_FP32, BF16_BY_HAND)
        acc = _dot(x_odd, w_lo, acc, DOT_FP32, BF16_BY_HAND)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + split * M * N + m[:, None] * N + n[None, :]
    tl.store(out, _round(acc, y_ptr.dtype.element_ty, BF16_BY_HAND), mask=m_ok[:, None] & n_ok[None, :])


@_jit
def _absmax(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, ok, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """Block `block`'s float32 absmax; nested, in bitsandbytes' order: code2[a8] · absmax2, then + offset."""
    if NESTED:  # one return below: the compiler refuses branches that return different types
        a8 = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        inner = tl.load(code2_ptr + a8, mask=ok, other=0.0) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=ok, other=0.0)
        scale = inner + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    return scale


@_jit
def _dequantize(code_ptr, nibbles, scale, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr,
                HALF: tl.constexpr):
    """code[nibbles] · scale in float32, each group of GROUP // 2 bytes times its own block's scale."""
    values = tl.load(code_ptr + nibbles.to(tl.int32))  # [BLOCK_N, HALF], 16 distinct addresses: cached
    grouped = tl.reshape(values, [BLOCK_N, GROUPS, GROUP // 2]) * scale[:, :, None]
    return tl.reshape(grouped, [BLOCK_N, HALF])


@_jit
def _dot(x, w, acc, DOT_FP32: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """acc + x·wᵀ: x [BLOCK_M, HALF] in the compute dtype, w [BLOCK_N, HALF] float32 rounded to it first
    (bitsandbytes dequantizes to the compute dtype before its product)."""
    w = _round(w, x.dtype, BF16_BY_HAND)
    if DOT_FP32:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@_jit
def _round(v, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """float32 v rounded to nearest even in `dtype`. Triton's interpreter truncates float32 to bf16
    where a GPU rounds; there the rounding is done on the bits (BF16_BY_HAND), so the interpreted
    checks see the values a GPU computes."""
    if BF16_BY_HAND:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # the bf16 value nearest, ties to even
        rounded = bits.to(tl.float32, bitcast=True).to(dtype)  # exact: the value is a bf16 already
    else:
        rounded = v.to(dtype)
    return rounded


def triton_kernel():
    """The kernel as Triton's JIT function: compiled per shape on its first launch (or interpreted:
    INTERPRETED), or ahead of time for a GPU that is not here (tests/test_nf4_kernel.py)."""
    return _nf4_matmul_kernel
