"""The fused NF4 kernel (bench/nf4_kernel.py) against bitsandbytes' own dequantization, on weights
bitsandbytes quantized itself, and against a real 4-bit load's layers.

Run by tests/test_nf4_kernel.py in a process of its own: with no GPU, under Triton's interpreter
(TRITON_INTERPRET=1, read when triton is first imported, which any peft import in the suite's own
process does first), which runs the same kernel source program by program on CPU tensors: the
unpacking, the nested scales, the masking and the accumulation are what is checked, not speed
(bench/nf4_decode.py times it on a GPU). Not named test_*.py, so the suite does not collect it in
its own process; `pytest tests/nf4_kernel_checks.py` runs it alone on a GPU, or on the CPU with
TRITON_INTERPRET=1 set.

Tolerances are derived, not tuned. The kernel's weights are bitsandbytes' to the bit (checked
exactly below), so what is left is the order of a float32 sum: any order of n products, each
rounded once, is within γₙ·Σ|x||w| of the exact sum (γₙ = n·u/(1 − n·u), u = 2⁻²⁴), and the
reference is the same sum in float64 from bitsandbytes' dequantized weights.
"""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.nn import Linear4bit, Params4bit

from adapters import BaseConfig, load_base
from bench import nf4_kernel
from bench.nf4_kernel import KernelConfig

DEVICE = "cpu" if nf4_kernel.INTERPRETED else "cuda"
"""Interpreted on the CPU; compiled on a GPU machine (bench/on_gpu_machine.sh with TESTS=...)."""
pytestmark = pytest.mark.skipif(not nf4_kernel.available() or (DEVICE == "cuda" and not torch.cuda.is_available()),
                                reason="needs triton, and a GPU or TRITON_INTERPRET=1 set before triton is imported")

U32 = 2.0**-24
U_BF16 = 2.0**-8  # bf16 keeps 8 significant bits: round to nearest is within 2⁻⁸ relative


def gamma(n: int, u: float = U32) -> float:
    return n * u / (1 - n * u)


def quantized(out: int, width: int, nested: bool, seed: int, blocksize: int = 64) -> Params4bit:
    """A random [out, width] weight quantized by bitsandbytes itself, as a Linear4bit holds it."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out, width, generator=g) * torch.rand(out, 1, generator=g) * 3).to(DEVICE)
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    return Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize, compress_statistics=nested,
                      quant_type="nf4", bnb_quantized=True)


def bnb_weights(weight: Params4bit) -> torch.Tensor:
    """bitsandbytes' own dequantization, float32 [out, in]."""
    return F.dequantize_4bit(weight.data, weight.quant_state).float()


def inputs(rows: int, width: int, dtype=torch.float32, seed: int = 7) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def assert_within_sum_bound(got: torch.Tensor, x: torch.Tensor, W: torch.Tensor, rounding: float = 0.0) -> None:
    """|got − x·Wᵀ| ≤ γ_{K+1}·|x|·|W|ᵀ (+ `rounding` relative to the result, for a bf16 output), per
    element, the reference in float64: the K products and the split-K partial sums' one extra add."""
    x64, W64 = x.double(), W.double()
    want = x64 @ W64.t()
    bound = gamma(x.shape[-1] + 1) * (x64.abs() @ W64.abs().t()) + rounding * want.abs()
    err = (got.double() - want).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), f"error {err.flatten()[worst]:.3g} over its bound {bound.flatten()[worst]:.3g}"


SHAPES = {  # (out, in): odd multiples of the block size, and tiles cut short in both directions
    "odd-blocks": (320, 192),
    "masked-tiles": (70, 320),
}
CONFIGS = {
    "default": nf4_kernel.DEFAULT,  # 256-wide steps: four scales a row per step, the last step cut short at 320
    "split-narrow": KernelConfig(block_n=16, block_k=32, split_k=3),  # steps inside a block, three partial sums
}
CASES = [  # (rows, config): every batch size with the default; the narrow launch (slow to interpret) at two
    *((rows, "default") for rows in (1, 3, 16, 20)),  # 20: two programs over the rows
    (3, "split-narrow"), (20, "split-narrow"),
]


@pytest.mark.parametrize("rows,config", CASES, ids=[f"{rows}-rows-{config}" for rows, config in CASES])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain"])
def test_matches_bitsandbytes_dequantized_product(nested, shape, rows, config):
    out, width = SHAPES[shape]
    weight = quantized(out, width, nested, seed=rows + out)
    x = inputs(rows, width)
    with torch.no_grad():
        got = nf4_kernel.nf4_matmul(x, weight, config=CONFIGS[config])
    assert got.shape == (rows, out) and got.dtype == torch.float32
    assert_within_sum_bound(got, x, bnb_weights(weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain"])
def test_every_weight_is_bitsandbytes_own_to_the_bit(nested, dtype):
    # One-hot rows pick single columns of W: each output is one product with 1 and zeros, exact in
    # any order, so it must equal bitsandbytes' dequantized weight (rounded to the dtype) exactly.
    out, width = 70, 320
    weight = quantized(out, width, nested, seed=11)
    W = bnb_weights(weight).to(dtype)
    for columns in (torch.arange(0, 16), torch.arange(137, 153), torch.arange(304, 320)):
        x = torch.zeros(len(columns), width, dtype=dtype, device=DEVICE)
        x[torch.arange(len(columns)), columns.to(DEVICE)] = 1
        with torch.no_grad():
            got = nf4_kernel.nf4_matmul(x, weight)
        assert torch.equal(got, W[:, columns.to(DEVICE)].t()), f"columns {columns[0]}..{columns[-1]}"


@pytest.mark.parametrize("rows", [1, 16])
def test_bf16_within_its_derived_bound(rows):
    # The weights are bitsandbytes' bf16 ones exactly and bf16 products are exact in float32, so
    # the bound is the float32 sum's plus the final rounding of y to bf16.
    out, width = 70, 320
    weight = quantized(out, width, nested=True, seed=rows)
    x = inputs(rows, width, torch.bfloat16)
    with torch.no_grad():
        got = nf4_kernel.nf4_matmul(x, weight)
    assert got.dtype == torch.bfloat16
    assert_within_sum_bound(got, x, bnb_weights(weight).to(torch.bfloat16), rounding=U_BF16)


@pytest.mark.parametrize("config", CONFIGS)
def test_adds_the_bias(config):
    out, width = 70, 192
    weight = quantized(out, width, nested=True, seed=3)
    x = inputs(3, width)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        with_bias = nf4_kernel.nf4_matmul(x, weight, bias, config=CONFIGS[config])
        without = nf4_kernel.nf4_matmul(x, weight, config=CONFIGS[config])
    # the same sum, then one more rounded add: within half an ulp of the sum plus the bias
    expected = without.double() + bias.double()
    assert (with_bias.double() - expected).abs().le(U32 * expected.abs() + gamma(width + 2) * (
        x.double().abs() @ bnb_weights(weight).double().abs().t())).all()
    assert not torch.equal(with_bias, without)


def test_keeps_the_leading_dimensions():
    weight = quantized(70, 192, nested=True, seed=9)
    x = inputs(6, 192).view(2, 3, 192)
    with torch.no_grad():
        got = nf4_kernel.nf4_matmul(x, weight)
        flat = nf4_kernel.nf4_matmul(x.reshape(6, 192), weight)
    assert got.shape == (2, 3, 70) and torch.equal(got.reshape(6, 70), flat)


def test_a_real_4bit_loads_layers_give_their_own_output(tiny_base):
    # tests/conftest.py's tiny Llama loaded as the server loads it: NF4, double quantization
    base = load_base(BaseConfig(str(tiny_base), quantize=True, device=DEVICE))
    layers = {name: m for name, m in base.model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 2 * 7  # two blocks of q, k, v, o, gate, up, down
    for name, layer in layers.items():
        assert layer.weight.quant_state.nested, name
        x = inputs(5, layer.in_features, base.compute_dtype, seed=len(name)).view(1, 5, -1)
        with torch.no_grad():
            want = layer(x)
            got = nf4_kernel.nf4_linear(layer, x)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        # two float32 sums of the same products, each within γ_{K+1}·Σ|x||w| of the exact one, each
        # then rounded to the compute dtype (bf16 on a GPU: within u/(1 − u) of what it returns)
        W = bnb_weights(layer.weight).to(base.compute_dtype).double()
        u = 0.0 if base.compute_dtype == torch.float32 else torch.finfo(base.compute_dtype).eps / 2
        bound = 2 * gamma(layer.in_features + 1) * (x.double().abs() @ W.abs().t()) + u / (1 - u) * (
            got.double().abs() + want.double().abs())
        assert bool(((got.double() - want.double()).abs() <= bound).all()), name


def test_refuses_what_it_cannot_read():
    weight = quantized(70, 192, nested=True, seed=1)
    with torch.no_grad():
        with pytest.raises(ValueError, match="input width 192"):
            nf4_kernel.nf4_matmul(inputs(2, 128), weight)
        with pytest.raises(ValueError, match="torch.int64"):
            nf4_kernel.nf4_matmul(torch.ones(2, 192, dtype=torch.long, device=DEVICE), weight)
        with pytest.raises(ValueError, match="no quant_state"):
            nf4_kernel.nf4_matmul(inputs(2, 192), torch.zeros(70, 192, device=DEVICE))
        with pytest.raises(ValueError, match="bias"):
            nf4_kernel.nf4_matmul(inputs(2, 192), weight, torch.zeros(69, device=DEVICE))
        packed, state = F.quantize_4bit(torch.randn(70, 192, device=DEVICE), blocksize=64, quant_type="fp4")
        fp4 = Params4bit(packed, requires_grad=False, quant_state=state, quant_type="fp4", bnb_quantized=True)
        with pytest.raises(ValueError, match="'fp4'"):
            nf4_kernel.nf4_matmul(inputs(2, 192), fp4)
    with pytest.raises(ValueError, match="autograd"):
        nf4_kernel.nf4_matmul(inputs(2, 192).requires_grad_(), weight)


def test_refuses_an_input_width_off_the_block_size():
    weight = quantized(8, 96, nested=False, seed=2)  # 96 = 1.5 blocks of 64: blocks straddle rows
    with pytest.raises(ValueError, match="not a multiple of the block size 64"):
        nf4_kernel.nf4_matmul(inputs(1, 96), weight)
