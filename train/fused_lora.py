"""One autograd function per adapted linear layer while training: the frozen base weight's product
and the LoRA branch in a single forward, with a hand-written backward.

peft's forward for a LoRA layer over a bitsandbytes 4-bit layer runs two autograd functions and
four submodule calls: the base layer (dequantize, matmul, cast), a defensive copy of its output,
the input cast to the adapter's float32, A, B, the scale, a cast back and an add. Each is a
kernel launch, and each repeats in the recompute and the backward of gradient checkpointing.
Where a step's time is set by launching kernels rather than running them (a GPU at batch 1: the
1B and 8B shapes' step times in bench/results/gpu-*.json grow with their layer count, not their
FLOPs), fewer launches are the speed-up. Here, in the compute dtype:

    forward   W = dequantize(W4);  out = x·Wᵀ;  h = x·Aᵀ;  out += s·h·Bᵀ
    backward  g_h = s·g·B;  dx = g·W + g_h·A;  dA = g_hᵀ·x;  dB = s·gᵀ·h   (W dequantized again)

Only x (already kept by the layer before) and the rank-r h are saved. A and B stay float32
parameters, as peft keeps them for the optimizer; their copies in the compute dtype are r-row
matrices, cheap to make each call. Layers this does not cover (DoRA, a trainable base weight,
several active adapters, peft's `adapter_names`) keep peft's forward.
"""

from __future__ import annotations

import copy
import types

import torch
from peft.tuners.lora import LoraLayer


PIECE_ROWS = 512
"""bf16 base products run on row pieces of at most this many rows..."""
TAIL_ROWS = 128
"""...and the last piece is padded to a multiple of this: one product shape runs on at most
PIECE_ROWS / TAIL_ROWS (4) row counts, whatever the batch's token count."""


def padded_rows(rows: int) -> int:
    """`rows` rounded up to whole pieces: full PIECE_ROWS pieces, then a last one of a multiple of
    TAIL_ROWS.

    oneDNN builds and keeps one bf16 kernel per product shape, each costing time to build and
    memory to keep (docs/performance.md#training-on-the-cpu), and length-grouped batches bring a new token count
    almost every step: a kernel built for nearly every step's count, its time and memory lost.
    In pieces, each product shape gets its few kernels in the first steps and keeps them, at the
    price of fewer than TAIL_ROWS rows computed and dropped per product."""
    full = rows - rows % PIECE_ROWS
    return full + -(-(rows - full) // TAIL_ROWS) * TAIL_ROWS


class FrozenBase:
    """The frozen base linear layer of one fused LoRA layer: its weight, dequantized from 4 bits at
    each use, and its products, in the compute dtype or in `products` (bf16).

    On the CPU the 4-bit weight's per-block scales, themselves 8-bit quantized (double
    quantization), are dequantized once and kept: bitsandbytes would redo it at every use, one
    more call into its library per product, each far slower inside a training step than alone
    (docs/performance.md#training-on-the-cpu). They cost 4 bytes per 64 weights; the
    dequantized weight is identical."""

    def __init__(self, layer: torch.nn.Module, products: torch.dtype | None = None):
        self.layer, self.products = layer, products
        self._scales: tuple[torch.Tensor, torch.Tensor] | None = None  # (the state's nested absmax, it dequantized)

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, [out, in], in `dtype` (None: the layer's compute dtype)."""
        weight = self.layer.weight
        state = getattr(weight, "quant_state", None)
        if state is None:
            return weight if dtype is None else weight.to(dtype)
        import bitsandbytes.functional as bnbf

        dtype = dtype or state.dtype
        # Compiled blocks (train/compiled.py) keep bitsandbytes' own call: a tensor kept on this
        # object from inside a traced function is one that torch.compile cannot return.
        plain = not state.nested or weight.device.type != "cpu" or weight.shape[0] == 1  # [1, n]: a layout bnb transposes
        if plain or torch.compiler.is_compiling():
            if dtype != state.dtype:
                state = copy.copy(state)  # the same codes and scales, dequantized into another dtype
                state.dtype = dtype
            return bnbf.dequantize_4bit(weight.data, state)
        if self._scales is None or self._scales[0] is not state.absmax:  # a new state: repacked, moved
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset  # as dequantize_4bit does
            self._scales = (state.absmax, absmax.float())
        return torch.ops.bitsandbytes.dequantize_4bit(weight.data, self._scales[1], state.blocksize, state.quant_type,
                                                      state.shape, dtype)

    def product(self, a: torch.Tensor, transpose: bool) -> torch.Tensor:
        """a·Wᵀ (transpose) or a·W, in a's dtype; with `products` (bf16) the operands are rounded
        to it, the product computed on row pieces (`padded_rows`) and each cast back."""
        w = self.weight(self.products)
        w = w.t() if transpose else w
        if self.products is None:
            return a @ w.to(a.dtype)
        rows = a.shape[0]
        operand = a.new_empty(padded_rows(rows), a.shape[1], dtype=self.products)  # the cast to bf16, padded
        operand[:rows].copy_(a)
        operand[rows:].zero_()
        out = a.new_empty(rows, w.shape[1])
        for start in range(0, rows, PIECE_ROWS):
            stop = min(start + PIECE_ROWS, rows)
            out[start:stop] = (operand[start:start + PIECE_ROWS] @ w)[:stop - start]  # the cast back
        return out


class LoraLinearFn(torch.autograd.Function):
    """out = x·Wᵀ + s·(x_d·Aᵀ)·Bᵀ (+ bias), W the frozen base weight, x_d x after the LoRA dropout."""

    @staticmethod
    def forward(ctx, x, x_dropped, A, B, base: FrozenBase, scale):
        # x, x_dropped: [tokens, in] (x_dropped None without dropout); A: [r, in]; B: [out, r]
        a, b = A.to(x.dtype), B.to(x.dtype)
        lora_in = x if x_dropped is None else x_dropped
        h = lora_in @ a.t()  # [tokens, r]
        out = base.product(x, transpose=True)  # [tokens, out]
        out.addmm_(h, b.t(), alpha=scale)
        if base.layer.bias is not None:
            out += base.layer.bias.to(out.dtype)
        ctx.save_for_backward(x, x_dropped, h, a, b)
        ctx.base, ctx.scale, ctx.dtypes = base, scale, (A.dtype, B.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, x_dropped, h, a, b = ctx.saved_tensors
        lora_in = x if x_dropped is None else x_dropped
        grad_h = (grad @ b).mul_(ctx.scale)  # [tokens, r]
        grad_A = (grad_h.t() @ lora_in).to(ctx.dtypes[0])  # [r, in]
        grad_B = (grad.t() @ h).mul_(ctx.scale).to(ctx.dtypes[1])  # [out, r]
        grad_x = grad_dropped = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.base.product(grad, transpose=False)  # [tokens, in]
            if x_dropped is None:
                grad_x.addmm_(grad_h, a)
        if x_dropped is not None and ctx.needs_input_grad[1]:
            grad_dropped = grad_h @ a
        return grad_x, grad_dropped, grad_A, grad_B, None, None


def _fused_forward(self: LoraLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [k for k in self.active_adapters if k in self.lora_A]
    covered = not (args or kwargs or self.disable_adapters or self.merged) and len(active) == 1
    if not covered or torch.is_autocast_enabled(x.device.type):  # autocast picks dtypes per op: peft's path
        return self._peft_forward(x, *args, **kwargs)
    if not self.training and self._frozen_base.products is not None:
        # Evals and generation in the precision the adapter is served in, so that a card's eval
        # loss and metric are what the server will give; bf16 products are for the training steps.
        return self._peft_forward(x, *args, **kwargs)
    key = active[0]
    x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
    dropout = self.lora_dropout[key]
    dropped = dropout(x2) if isinstance(dropout, torch.nn.Dropout) and self.training and dropout.p > 0 else None
    out = LoraLinearFn.apply(x2, dropped, self.lora_A[key].weight, self.lora_B[key].weight, self._frozen_base,
                             self.scaling[key])
    return out.view(*x.shape[:-1], out.shape[-1])


def fusable(layer: LoraLayer) -> bool:
    """Plain LoRA on a frozen linear layer (4-bit or not), in the weight's compute dtype."""
    base = layer.get_base_layer()
    plain = not any(layer.use_dora.values()) and not getattr(layer, "lora_variant", {})
    linear = isinstance(base, torch.nn.Linear)  # bitsandbytes' Linear4bit is one too
    return plain and linear and not base.weight.requires_grad and not getattr(layer, "fan_in_fan_out", False)


def fuse_lora_layers(model: torch.nn.Module, base_products: torch.dtype | None = None) -> int:
    """Give every fusable LoRA layer of `model` the fused forward; returns how many were changed.

    base_products: compute the frozen base's products (forward, and the input gradient through
    it) in this dtype (bf16) from the 4-bit codes, the rest of the layer in the compute dtype.
    Where bf16 products are fast (a CPU with AMX) that is most of a step's time; the price is
    the products' precision (an 8-bit mantissa), which the bench's eval loss shows."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and not hasattr(module, "_peft_forward") and fusable(module):
            module._peft_forward = module.forward
            module._frozen_base = FrozenBase(module.get_base_layer(), base_products)
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def base_products_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype the fused layers of `model` compute the base's products in (None: the compute dtype)."""
    return next((m._frozen_base.products for m in model.modules() if hasattr(m, "_frozen_base")), None)
