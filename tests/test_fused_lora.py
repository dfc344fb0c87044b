"""The fused training forward (train/fused_lora.py) computes what peft's does, gradients included,
and a 4-bit base keeps passing gradients after an eval pass (train.loop.keep_4bit_layers_differentiable)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from adapters import BaseConfig, load_base
from train.fused_lora import (PIECE_ROWS, TAIL_ROWS, FrozenBase, LoraLinearFn, base_products_dtype, fuse_lora_layers,
                              padded_rows)
from train.loop import keep_4bit_layers_differentiable

IDS = torch.tensor([[2, 7, 19, 33, 5, 81, 12, 9, 44, 3, 60, 17], [2, 11, 4, 90, 23, 8, 6, 71, 35, 14, 29, 50]])


def lora_model(tiny_base, quantize: bool, dtype=None, dropout: float = 0.0):
    base = load_base(BaseConfig(str(tiny_base), quantize=quantize))
    if dtype is not None:
        base.model.to(dtype)
    keep_4bit_layers_differentiable(base.model)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=12, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(base.model, config)


def loss_and_grads(model, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks on both paths
    loss = model(input_ids=IDS, labels=IDS, use_cache=False).loss  # as train.evaluate.token_loss_sum runs it
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(expected, got, rtol: float) -> None:
    (loss0, grads0), (loss1, grads1) = expected, got
    assert loss1 == pytest.approx(loss0, rel=rtol)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name, grad in grads0.items():
        error = (grads1[name] - grad).abs().max() / grad.abs().max()
        assert error < rtol, (name, float(error))


def float32_order_tolerance(model, margin: float = 2.0) -> float:
    """How far two float32 computations of the same gradients may drift when they sum the same
    products in other orders (the fused path fuses what peft runs as separate ops).

    A float32 sum of K terms may move by up to K·u of their magnitude (u = 2**-24, the unit
    roundoff; the worst-case bound γ_K ≈ K·u). Every gradient here flows back through the output
    head's reduction over the vocabulary, the longest one in the model, so K = vocab size bounds
    the drift; times a margin of 2. (Measured on an AVX512 CPU: at most 1.03e-5, the bound is 4.7e-5.)"""
    return margin * model.config.vocab_size * 2.0**-24


@pytest.mark.parametrize("quantize,dropout", [(True, 0.0), (False, 0.0), (True, 0.3)], ids=["4bit", "unquantized", "4bit-dropout"])
def test_fused_layers_give_peft_loss_and_gradients(tiny_base, quantize, dropout):
    model = lora_model(tiny_base, quantize, dropout=dropout)
    expected = loss_and_grads(model)
    assert fuse_lora_layers(model) == 7 * model.config.num_hidden_layers  # every linear layer of every block
    assert_close(expected, loss_and_grads(model), rtol=float32_order_tolerance(model))


def gradient_error(expected, got) -> float:
    """The worst parameter's relative gradient error, ||got - expected|| / ||expected||."""
    return max(float((got[1][n] - g).norm() / g.norm()) for n, g in expected[1].items())


@pytest.mark.slow
def test_fused_layers_in_bf16_are_as_close_to_float32_as_peft_in_bf16(tiny_base):
    """peft runs the LoRA branch in float32, the fused path in the base's bf16 (as on a GPU). On
    this tiny random model bf16 alone moves some gradients by ~25%, so both are held against the
    float32 run: the fused path may not be much further from it than peft's bf16 run, and a wrong
    branch (a scale 25% off) is far further."""
    reference = loss_and_grads(lora_model(tiny_base, quantize=False))
    model = lora_model(tiny_base, quantize=False, dtype=torch.bfloat16)
    peft_error = gradient_error(reference, loss_and_grads(model))
    fuse_lora_layers(model)
    fused_error = gradient_error(reference, loss_and_grads(model))
    assert fused_error < 1.5 * peft_error + 0.01, (fused_error, peft_error)
    for layer in (m for m in model.modules() if hasattr(m, "_peft_forward")):
        layer.scaling["default"] *= 1.25
    assert gradient_error(reference, loss_and_grads(model)) > 3 * peft_error


def test_fused_layers_fall_back_to_peft_where_they_do_not_apply(tiny_base):
    model = lora_model(tiny_base, quantize=True)
    fuse_lora_layers(model)
    model.eval()  # peft takes adapter_names only in eval mode
    calls = []
    original = LoraLinearFn.apply
    LoraLinearFn.apply = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            mixed = model(input_ids=IDS, adapter_names=["default", "__base__"]).logits  # peft's per-row path
            with model.disable_adapter():
                plain = model(input_ids=IDS).logits
            assert not calls
            fused = model(input_ids=IDS).logits
            assert calls
    finally:
        LoraLinearFn.apply = original
    assert torch.allclose(mixed[0], fused[0], atol=1e-4) and torch.allclose(mixed[1], plain[1], atol=1e-4)


@pytest.mark.slow
def test_an_eval_pass_does_not_change_the_next_training_gradients(tiny_base):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel without a backward on the first
    eval-mode forward (on CPUs with AVX512-BF16); training after it must still see every gradient."""
    model = lora_model(tiny_base, quantize=True)
    before = loss_and_grads(model)
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    assert_close(before, loss_and_grads(model), rtol=1e-6)


def test_weights_repacked_before_training_are_unpacked(tiny_base):
    """A base that already ran an eval-mode forward (repacked, where the CPU has AVX512-BF16) is
    unpacked to the original layout: the same weights, up to bitsandbytes' bf16 rounding of the
    block scales in its packed format (well under 1%; a wrong layout would be garbage)."""
    never_packed = load_base(BaseConfig(str(tiny_base)))
    assert keep_4bit_layers_differentiable(never_packed.model) == 0
    served = load_base(BaseConfig(str(tiny_base)))
    with torch.no_grad():
        served.model(input_ids=IDS)  # as a serving warm-up does
    keep_4bit_layers_differentiable(served.model)
    pairs = [(a, b) for a, b in zip(never_packed.model.modules(), served.model.modules()) if hasattr(a, "support_avx512bf16_for_cpu")]
    assert len(pairs) == 7 * never_packed.model.config.num_hidden_layers
    for original, unpacked in pairs:
        assert not getattr(unpacked.weight.quant_state, "packing_format_for_cpu", False)
        expected = FrozenBase(original).weight()
        assert (FrozenBase(unpacked).weight() - expected).abs().max() < 0.01 * expected.abs().max()


def test_the_fused_layers_are_the_default_on_the_cpu_only(tiny_base):
    """Measured: faster than peft's forward on the CPU, no steady gain on an H100 (docs/performance.md)."""
    from types import SimpleNamespace

    from train.loop import use_fused_lora

    model = lora_model(tiny_base, quantize=True)
    assert use_fused_lora(None, model) and use_fused_lora(True, model) and not use_fused_lora(False, model)
    on_gpu = SimpleNamespace(parameters=lambda: iter([torch.empty(0, device="meta")]))  # any non-CPU device
    assert not use_fused_lora(None, on_gpu) and use_fused_lora(True, on_gpu)


def test_bf16_base_products_are_the_default_on_a_cpu_with_amx_for_a_float32_base(tiny_base):
    """Measured faster on a Xeon with AMX (docs/performance.md#training-on-the-cpu); a CPU without
    AMX and a base already in bf16 keep the compute dtype; asking either way wins. The CPU's
    flags are the caller's argument, so the verdict is the same on every machine."""
    from train.loop import use_bf16_base_products

    float32, bf16 = lora_model(tiny_base, quantize=True), lora_model(tiny_base, quantize=False, dtype=torch.bfloat16)
    assert use_bf16_base_products(None, float32, amx=True)
    assert not use_bf16_base_products(None, float32, amx=False)
    assert not use_bf16_base_products(None, bf16, amx=True)
    assert use_bf16_base_products(True, float32, amx=False) and not use_bf16_base_products(False, float32, amx=True)


def test_bf16_base_products_are_for_training_steps_only(tiny_base):
    """In eval mode (the card's eval loss and metric, generation) a model trained with bf16
    products answers as it will be served, in the compute dtype: as peft's own forward, to float32
    rounding; in training mode its products are bf16's, about 3e-3 apart (a rounding of 2**-8)."""
    model = lora_model(tiny_base, quantize=True)
    model.eval()
    with torch.no_grad():
        served = model(input_ids=IDS).logits
        fuse_lora_layers(model, torch.bfloat16)
        evaluated = model(input_ids=IDS).logits
        model.train()
        trained = model(input_ids=IDS).logits
    assert torch.equal(evaluated, served)
    assert (trained - served).abs().max() > 1e-4 * served.abs().max()


@pytest.mark.parametrize("rows", [24, 128, 600], ids=["rows-padded", "rows-as-they-are", "two-pieces"])
def test_bf16_base_products_round_only_the_base_product(tiny_base, rows):
    """`fuse_lora_layers(model, torch.bfloat16)` (`--bf16-base-products`): the base's product and
    the input gradient through it come from bf16 operands, the LoRA branch's gradients not at all.

    Each operand is rounded once to bf16 (unit roundoff u = 2**-8) and the product once more on
    its way back; for sums of terms of random sign the errors add as a random walk, so the
    result's normwise relative error is about √3·u = 6.8e-3 (measured 2.9e-3 for both, on a Xeon
    with AMX); the bound 4u = 0.0156 leaves a margin of over 2 on √3·u, while a product in the
    wrong dtype or a dropped term would be off by O(1). 24 rows are padded to 128 for the bf16
    product and 600 run as a 512-row piece and a padded 128-row one (`padded_rows`); padding rows
    that leaked into the result, or a piece left out, would be off by O(1) too."""
    base = load_base(BaseConfig(str(tiny_base), quantize=True))
    keep_4bit_layers_differentiable(base.model)
    layer = base.model.model.layers[0].mlp.up_proj  # a 4-bit Linear
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, layer.in_features, generator=generator)
    A = torch.randn(4, layer.in_features, generator=generator) * 0.1
    B = torch.randn(layer.out_features, 4, generator=generator) * 0.1
    grad = torch.randn(rows, layer.out_features, generator=generator)

    def run(products):
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        out = LoraLinearFn.apply(leaves[0], None, leaves[1], leaves[2], FrozenBase(layer, products), 3.0)
        out.backward(grad)
        return out.detach(), *(t.grad for t in leaves)

    (out32, dx32, dA32, dB32), (out16, dx16, dA16, dB16) = run(None), run(torch.bfloat16)
    assert out16.dtype == dx16.dtype == torch.float32
    bound = 4 * 2.0**-8
    for name, got, want in (("output", out16, out32), ("input gradient", dx16, dx32)):
        error = float((got - want).norm() / want.norm())
        assert 0 < error < bound, (name, error)  # > 0: the products did run in bf16
    assert dA16.equal(dA32) and dB16.equal(dB32)


def test_the_kept_block_scales_give_bitsandbytes_own_weights(tiny_base):
    """The nested absmax dequantized once and kept (`FrozenBase.weight`) gives exactly the weight
    bitsandbytes' dequantize_4bit gives, in float32 and bf16; a layer whose quant state is
    replaced (repacked, reloaded) gets its new scales, not the kept ones."""
    import copy

    import bitsandbytes.functional as bnbf

    base = load_base(BaseConfig(str(tiny_base), quantize=True))
    layer = base.model.model.layers[0].self_attn.q_proj
    state = layer.weight.quant_state
    assert state.nested  # the project's 4-bit bases are double-quantized
    frozen = FrozenBase(layer)
    for dtype in (torch.float32, torch.bfloat16):
        wanted = copy.copy(state)
        wanted.dtype = dtype
        assert frozen.weight(dtype).equal(bnbf.dequantize_4bit(layer.weight.data, wanted))
    other = base.model.model.layers[1].self_attn.q_proj.weight
    layer.weight.data, layer.weight.quant_state = other.data, other.quant_state  # another layer's codes and scales
    assert frozen.weight().equal(bnbf.dequantize_4bit(other.data, other.quant_state))


def test_padded_rows_bound_both_the_waste_and_the_count_of_shapes():
    """Fewer than TAIL_ROWS rows of padding per product, and every piece a product runs on has one
    of PIECE_ROWS / TAIL_ROWS row counts (so that many bf16 kernels per product shape), whatever
    the row count."""
    pieces = set()
    for rows in range(1, 9000):
        padded = padded_rows(rows)
        assert rows <= padded < rows + TAIL_ROWS, rows
        pieces |= {min(PIECE_ROWS, padded - start) for start in range(0, rows, PIECE_ROWS)}
    assert pieces == set(range(TAIL_ROWS, PIECE_ROWS + 1, TAIL_ROWS))


def test_the_fused_layers_say_which_dtype_the_base_products_run_in(tiny_base):
    """What the card records as `training.base_products` (None: the compute dtype)."""
    model = lora_model(tiny_base, quantize=True)
    assert base_products_dtype(model) is None
    fuse_lora_layers(model, torch.bfloat16)
    assert base_products_dtype(model) == torch.bfloat16
