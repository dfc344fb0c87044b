"""The Triton LoRA kernel (bench/lora_triton.py, a bench-only experiment) against a float64
reference, and the router and the engine routed through it against the torch path.

Run by tests/test_lora_triton.py in a process of its own: with no GPU there, under Triton's
interpreter (TRITON_INTERPRET=1, which Triton reads when it is first imported, and this
session's peft import would come first), which executes the same kernel source program by
program on CPU tensors: the indexing, masking, slot routing and accumulation are what is
checked, not speed (bench-gpu times it on a GPU). Not named test_*.py, so the suite does not
collect it in its own process; `pytest tests/lora_triton_checks.py` runs it alone on a GPU, or
on the CPU with TRITON_INTERPRET=1 set.
"""

from __future__ import annotations

import pytest
import torch

from adapters import BaseConfig, load_base
from bench import lora_triton
from serve.engine import Engine
from tests.conftest import PROMPTS, request, texts
from tests.test_routing import engine, mixed_ranks, peft_logits, routed_logits  # noqa: F401  fixtures

DEVICE = "cpu" if lora_triton.INTERPRETED else "cuda"
"""Interpreted on the CPU; compiled on a GPU machine (bench/on_gpu_machine.sh with TESTS=...)."""
pytestmark = pytest.mark.skipif(not lora_triton.available() or (DEVICE == "cuda" and not torch.cuda.is_available()),
                                reason="needs triton, and a GPU or TRITON_INTERPRET=1 set before triton is imported")


def reference(result, x, A_rows, Bt, item_indices, scales, rank):
    """float64: result[m] + scale_s·(x[m]·A_sᵀ)·Bt_s, A_rows(s) giving slot s's [R, in] block."""
    out = result.double().clone().view(-1, result.shape[-1])
    x2 = x.double().reshape(-1, x.shape[-1])
    per_item = x2.shape[0] // item_indices.numel()
    for m in range(x2.shape[0]):
        s = int(item_indices[m // per_item])
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
    (batch, seq), item_indices = CASES[case]
    rank, width, out = 6, 200, 300
    A, Bt, scales = stacks(3, rank, width, out, dtype, seed=len(case))
    g = torch.Generator().manual_seed(7)
    x, result, slots = on_device(torch.randn(batch, seq, width, generator=g).to(dtype),
                                 torch.randn(batch, seq, out, generator=g).to(dtype), torch.tensor(item_indices))
    want = reference(result, x, lambda s: A[s * rank : (s + 1) * rank], Bt, slots, scales, rank)
    got = result.clone()
    with torch.no_grad():
        assert lora_triton.lora_add_(got, x, A, Bt, slots, scales, rank, max_rows=4, config=CONFIGS[config])
    assert relative_error(got, want) < tolerance
    per_item = batch * seq // len(item_indices)
    for item, slot in enumerate(item_indices):  # base rows: not a bit changed
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
    x, result, item_indices = on_device(torch.randn(2, 1, width), torch.randn(2, 1, out), torch.tensor([2, 0]))
    want = reference(result, x, lambda s: A[s], Bt, item_indices, scales, rank)
    got = result.clone()
    with torch.no_grad():
        assert lora_triton.lora_add_(got, x, A, Bt, item_indices, scales, rank, max_rows=4)
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




DECODE_STEPS = {"one-adapter": (["a"], 1), "mixed": (["small", "base", "b", "a"], 1), "two-tokens": (["b", "a"], 2)}
"""Rows (adapters, tokens per row) of the small steps the kernel takes."""


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared-inputs"])
@pytest.mark.parametrize("step", DECODE_STEPS)
def test_the_router_through_the_kernel_matches_peft_per_row(engine, tiny_base, mixed_ranks, step, shared):  # noqa: F811
    names, tokens = DECODE_STEPS[step]
    ids = torch.tensor([[7 + 3 * row + t for t in range(tokens)] for row in range(len(names))])
    mask = torch.ones_like(ids)
    expected = peft_logits(tiny_base, mixed_ranks, ids, mask, ["__base__" if n == "base" else n for n in names])
    routed_logits(engine, ids, mask, names)  # makes the adapters resident: the router now exists
    with lora_triton.routed(engine.router, group_inputs=shared) as answers:
        got = routed_logits(engine, ids, mask, names)
    assert answers == [True] * len(engine.router.layers())  # every adapted layer's delta came from the kernel
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_the_engine_answers_through_the_kernel_as_through_torch(served, tiny_base):
    # Unquantized: bitsandbytes' CPU kernel rounds its input to bf16, which can flip a near-tie
    # between two correct float32 paths (tests/test_routing.py says more).
    _, _, registry = served
    engine = Engine(load_base(BaseConfig(str(tiny_base), quantize=False)), registry, lora_kernel="torch")  # noqa: F811
    batch = [request(name, PROMPTS[0]) for name in ("base", "a", "b")]
    try:
        expected = texts(engine, batch)  # makes a and b resident: nothing rebuilds the router below
        with lora_triton.routed(engine.router) as answers:
            got = texts(engine, batch)
    finally:
        engine.close()
    assert got == expected
    assert answers.count(True) > 0 and answers.count(False) > 0  # decode steps taken, prefills (5+ rows) declined
