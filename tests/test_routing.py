"""The router's ways of adding each row's LoRA delta all agree with peft's own per-row path.

The comparisons run on the unquantized tiny base: bitsandbytes' CPU 4-bit kernel rounds its input
to bfloat16, which turns a 1e-7 difference in summation order into a 0.03 jump, so two correct
paths can differ there by more than any tolerance that would still catch a wrong one. The engine
tests cover the 4-bit base end to end (a mixed batch answers as each request alone).
"""

from __future__ import annotations

import dataclasses
import shutil
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

import serve.routing as routing
from adapters import AdapterStore, BaseConfig, BaseShape, load_base
from adapters.chat import left_pad
from bench.routing import restacked
from serve import kernels
from serve.engine import Engine
from serve.registry import AdapterRegistry
from tests.conftest import save_random_adapter

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the fused CPU kernel")


@pytest.fixture(scope="module")
def mixed_ranks(tiny_base, tmp_path_factory):
    """Three random adapters: "small" of rank 2 with its own alpha (padded to rank 4), "b" with
    rank 2 in q_proj only (so q_proj layers have their own alpha/r per slot)."""
    store = AdapterStore(tmp_path_factory.mktemp("routing-store"))
    save_random_adapter(store, "a", tiny_base, seed=21)
    for name, seed, config in (("b", 22, LoraConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 2})),
                               ("small", 23, LoraConfig(r=2, lora_alpha=3))):
        torch.manual_seed(seed)
        config.target_modules, config.init_lora_weights = "all-linear", False
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), config)
        save_random_adapter(store, name, tiny_base, seed=seed, model=model)
    return store


def peft_logits(tiny_base, store: AdapterStore, ids, mask, adapter_names: list[str]) -> torch.Tensor:
    """The reference: peft's own mixed-batch forward (`adapter_names`) on a fresh copy of the base."""
    base = load_base(BaseConfig(str(tiny_base), quantize=False))
    model = PeftModel.from_pretrained(base.model, str(store.path("a")), adapter_name="a")
    for name in ("b", "small"):
        model.load_adapter(str(store.path(name)), adapter_name=name)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, adapter_names=adapter_names).logits


def routed_logits(engine: Engine, ids, mask, names: list[str], replayed: bool = False) -> torch.Tensor:
    entries = [None if n == "base" else engine.registry.resolve(n) for n in names]
    with torch.no_grad():
        engine.make_resident([e for e in entries if e is not None])
        model = engine.route([e.key if e else None for e in entries], replayed=replayed)
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module")
def engine(tiny_base, mixed_ranks):
    base = load_base(BaseConfig(str(tiny_base), quantize=False))
    registry = AdapterRegistry(mixed_ranks, BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    engine = Engine(base, registry, max_loaded=4)
    with engine.lock:  # every adapter resident, so the router exists whichever test runs first
        engine.make_resident(registry.servable())
    return engine


def batch(engine: Engine, n: int):
    prompts = [[engine.base.tokenizer.bos_token_id, 5 + i, 9, 11 + 2 * i, 7][: 3 + i % 3] for i in range(n)]
    return left_pad(prompts, engine.base.tokenizer.pad_token_id)


ROWS = [["a", "small", "base", "b", "a"], ["small"] * 3, ["base", "base"]]


def shared_inputs(router):
    """q/k/v and gate/up sharing one A stack (`InputGroup`), as on a GPU; the CPU's kernel is off
    for it. Restacked as before afterwards (the engine is shared by the module's tests)."""
    return restacked(router, group_inputs=True)


@pytest.mark.parametrize("names", ROWS, ids=["mixed", "one-adapter", "base-only"])
@pytest.mark.parametrize("path", ["kernel", "torch", "grouped", "shared-inputs", "shared-inputs-grouped"])
def test_every_path_matches_peft_per_row(engine, tiny_base, mixed_ranks, monkeypatch, names, path):
    ids, mask = batch(engine, len(names))
    expected = peft_logits(tiny_base, mixed_ranks, ids, mask, ["__base__" if n == "base" else n for n in names])
    routed_logits(engine, ids, mask, names)  # makes the adapters resident: the router now exists
    router = engine.router
    if path == "kernel":
        if shutil.which("c++") is None:
            pytest.skip("no C++ compiler to build the fused CPU kernel")
        assert router.lora_add is not None, "the kernel did not build on a machine with a compiler"
    else:
        monkeypatch.setattr(router, "lora_add", None)
    if path.endswith("grouped"):
        monkeypatch.setattr(routing, "KERNEL_MAX_ROWS", 0)  # every batch counts as a long prefill
    with shared_inputs(router) if path.startswith("shared") else nullcontext():
        assert len(router.stacks.input_groups) == (2 * engine.base.model.config.num_hidden_layers if path.startswith("shared") else 0)
        got = routed_logits(engine, ids, mask, names)
        assert all(group.holds_nothing() for group in router.stacks.input_groups)  # every member read its share: nothing held
    assert len(router.stacks.scale_vectors) == 2  # q_proj's alpha/r differ for "b"
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_shared_inputs_route_under_inference_mode(engine, monkeypatch):
    """Inference tensors keep no version counter; the shared product must not ask them for one."""
    names = ["a", "small", "base"]
    ids, mask = batch(engine, len(names))
    routed_logits(engine, ids, mask, names)
    router = engine.router
    monkeypatch.setattr(router, "lora_add", None)
    expected = routed_logits(engine, ids, mask, names)
    with shared_inputs(router), torch.inference_mode():
        entries = [None if n == "base" else engine.registry.resolve(n) for n in names]
        got = engine.route([e.key if e else None for e in entries])(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class CountMatmuls(TorchDispatchMode):
    """Counts aten.mm calls (the routed paths' x·Aᵀ products; the base's linear layers run addmm/mm too)."""

    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.mm += func is torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("names", [["a", "a"], ["a", "small"]], ids=["one-adapter", "mixed"])
def test_shared_inputs_take_one_product_per_group(engine, monkeypatch, names):
    """q/k/v share one x·Aᵀ, gate/up another: three products fewer per block than one per layer."""
    ids, mask = batch(engine, len(names))
    routed_logits(engine, ids, mask, names)
    router = engine.router
    monkeypatch.setattr(router, "lora_add", None)
    counts = []
    for grouped in (False, True):
        with shared_inputs(router) if grouped else nullcontext(), CountMatmuls() as count:
            routed_logits(engine, ids, mask, names)
        counts.append(count.mm)
    assert counts[0] - counts[1] == 3 * engine.base.model.config.num_hidden_layers


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared-inputs"])
@pytest.mark.parametrize("shrink", [pytest.param(name, marks=[pytest.mark.slow] if name == "reduce" else [])
                                    for name in sorted(routing.SHRINKS)])  # reduce compiles with Inductor
def test_each_shrink_matches_peft_on_one_row(engine, tiny_base, mixed_ranks, monkeypatch, shrink, shared):
    """Each way of computing a row's x·Aᵀ on the one-adapter path gives peft's logits, for a
    decode step's single row (where it is used) and for a prefill's several (where `mm` is)."""
    calls = []
    product = routing.SHRINKS[shrink]
    monkeypatch.setitem(routing.SHRINKS, shrink, lambda x2, At: calls.append(x2.shape[0]) or product(x2, At))
    for ids in (torch.tensor([[7]]), torch.tensor([[7, 9, 11]])):
        mask = torch.ones_like(ids)
        expected = peft_logits(tiny_base, mixed_ranks, ids, mask, ["small"])
        routed_logits(engine, ids, mask, ["small"])  # makes the adapter resident: the router now exists
        router = engine.router
        with restacked(router, shrink=shrink, group_inputs=shared):
            router.lora_add = None  # the torch path, where the choice applies
            got = routed_logits(engine, ids, mask, ["small"])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Per block 7 adapted layers, one product each; sharing, q/k/v take one and gate/up another.
    products = engine.base.model.config.num_hidden_layers * (4 if shared else 7)
    assert calls == [1] * products + [3] * products


def test_a_shrink_choice_is_checked():
    with pytest.raises(ValueError, match="LoRA shrink 'fast'.*auto, mm, reduce"):
        routing.LoraRouter(torch.nn.Linear(2, 2), shrink="fast")


def test_auto_takes_the_compiled_reduction_only_for_replayed_steps_on_a_gpu(monkeypatch):
    """(eager steps, replayed steps): the compiled kernel's host cost is paid only outside a graph."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(routing, "triton_installed", lambda: True)
    assert routing.auto_shrinks(cuda) == ("mm", "reduce")
    assert routing.auto_shrinks(cpu) == ("mm", "mm")
    monkeypatch.setattr(routing, "triton_installed", lambda: False)  # Inductor writes it in Triton
    assert routing.auto_shrinks(cuda) == ("mm", "mm")


@pytest.mark.slow  # torch.compile, twice
def test_reduce_computes_the_product_and_survives_a_failing_compiler(monkeypatch):
    x2, A = torch.randn(1, 64), torch.randn(48, 64)
    expected = x2 @ A.t()
    torch.testing.assert_close(routing.SHRINKS["reduce"](x2, A.t()), expected)
    assert routing.SHRINKS["reduce"](torch.randn(3, 64), A.t()).shape == (3, 48)  # more rows: mm

    def broken(graph, inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(routing, "_compiled_row_reduce", lambda: torch.compile(routing._row_reduce, backend=broken))
    try:
        torch.testing.assert_close(routing.SHRINKS["reduce"](x2, A.t()), expected)
    finally:
        # dynamo remembers the failed frame as one to skip; the next test's compiler must start clean
        torch._dynamo.reset()


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared-inputs"])
def test_replayed_steps_take_the_replayed_shrink(engine, tiny_base, mixed_ranks, monkeypatch, shared):
    """Rows set for a replayed step (and the run before its capture) compute x·Aᵀ with auto's
    second choice, input groups included; the next eager step goes back to the first. Here a
    copy of `mm` stands in for the GPU's compiled reduction, and both give peft's logits."""
    calls = {"mm": 0, "stand_in": 0}
    for name in calls:
        monkeypatch.setitem(routing.SHRINKS, name,
                            lambda x2, At, name=name: calls.__setitem__(name, calls[name] + 1) or torch.mm(x2, At))
    monkeypatch.setattr(routing, "auto_shrinks", lambda device: ("mm", "stand_in"))
    ids = torch.tensor([[7]])
    mask = torch.ones_like(ids)
    expected = peft_logits(tiny_base, mixed_ranks, ids, mask, ["small"])
    routed_logits(engine, ids, mask, ["small"])  # makes the adapter resident: the router now exists
    products = engine.base.model.config.num_hidden_layers * (4 if shared else 7)
    with restacked(engine.router, shrink="auto", group_inputs=shared) as router:
        router.lora_add = None  # the torch path, where the choice applies
        for replayed, used, unused in ((True, "stand_in", "mm"), (False, "mm", "stand_in"), (True, "stand_in", "mm")):
            before = dict(calls)
            got = routed_logits(engine, ids, mask, ["small"], replayed=replayed)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            assert (calls[used] - before[used], calls[unused] - before[unused]) == (products, 0)


def test_the_adapters_change_the_logits(engine, tiny_base, mixed_ranks):
    """Guards the comparison above: with adapters that were no-ops it would pass trivially."""
    ids, mask = batch(engine, 3)
    base_rows = routed_logits(engine, ids, mask, ["base"] * 3)
    for name in ("a", "small"):
        assert (routed_logits(engine, ids, mask, [name] * 3) - base_rows).abs().max() > 1e-2


@needs_compiler
def test_kernel_adds_each_rows_own_delta():
    kernel = kernels.load()
    assert kernel is not None
    torch.manual_seed(0)
    slots, R, n_in, n_out, seq = 3, 4, 24, 40, 2
    A, Bt = torch.randn(slots * R, n_in), torch.randn(slots * R, n_out)
    A[R + 2 :][: R - 2] = 0  # slot 1 has rank 2: its padding rows are zero, as the router makes them
    Bt[R + 2 :][: R - 2] = 0
    scales = torch.tensor([0.5, 2.0, 1.5])
    item_indices = torch.tensor([2, -1, 0, 1])
    x = torch.randn(len(item_indices), seq, n_in)
    result = torch.randn(len(item_indices), seq, n_out)
    expected = result.double().clone()
    for item, s in enumerate(item_indices.tolist()):
        if s >= 0:
            block = slice(s * R, (s + 1) * R)
            expected[item] += scales[s].double() * (x[item].double() @ A[block].double().t()) @ Bt[block].double()
    with torch.no_grad():
        assert kernel.lora_add_(result, x, A, Bt, item_indices, scales, R, 64) is True
    torch.testing.assert_close(result.double(), expected, atol=1e-4, rtol=1e-5)
    one = torch.randn(3, 5, n_in)  # a single slot for every row: a one-element slot tensor
    out = torch.zeros(3, 5, n_out)
    with torch.no_grad():
        kernel.lora_add_(out, one, A, Bt, torch.tensor([1]), scales, R, 64)
    torch.testing.assert_close(out, 2.0 * (one @ A[R : 2 * R].t()) @ Bt[R : 2 * R], atol=1e-4, rtol=1e-5)


@needs_compiler
def test_kernel_declines_what_it_does_not_take():
    """False and nothing written: the router then takes the torch path."""
    kernel = kernels.load()
    A, Bt, scales, slots = torch.randn(4, 8), torch.randn(4, 6), torch.ones(1), torch.tensor([0])
    x, result = torch.randn(2, 3, 8), torch.zeros(2, 3, 6)
    assert kernel.lora_add_(result, x, A, Bt, slots, scales, 4, 64) is False  # autograd is recording
    with torch.no_grad():
        assert kernel.lora_add_(result, x, A, Bt, slots, scales, 4, 5) is False  # 6 rows > 5
        assert kernel.lora_add_(result, x.bfloat16(), A, Bt, slots, scales, 4, 64) is False
        assert kernel.lora_add_(result, x.transpose(0, 1), A, Bt, slots, scales, 4, 64) is False
    assert result.abs().max() == 0


def test_bfloat16_stacks_route_like_peft(tiny_base, mixed_ranks, monkeypatch):
    """The GPU's case, on the CPU: stacks in bf16 (the kernel is float32-only, so the torch paths
    run); bf16 rounding sets the tolerance, far below what a wrong adapter would change."""
    from serve.routing import LoraRouter

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    peft = PeftModel.from_pretrained(model, str(mixed_ranks.path("a")), adapter_name="a")
    for name in ("b", "small"):
        peft.load_adapter(str(mixed_ranks.path(name)), adapter_name=name)
    ids, mask = left_pad([[2, 5 + i, 9, 11, 7][: 3 + i % 3] for i in range(4)], 0)
    names = ["a", "small", "__base__", "b"]
    with torch.no_grad():
        expected = peft(input_ids=ids, attention_mask=mask, adapter_names=names).logits.float()
        wrong = peft(input_ids=ids, attention_mask=mask, adapter_names=["b", "a", "__base__", "small"]).logits.float()
        router = LoraRouter(peft, torch.bfloat16)
        router.rebuild(["a", "b", "small"])
        assert router.lora_add is None and router.stacks.input_groups  # q/k/v and gate/up share their products
        for rows in (64, 0):  # the masked step, then the grouped prefill
            monkeypatch.setattr(routing, "KERNEL_MAX_ROWS", rows)
            router.set_rows([None if n == "__base__" else n for n in names])
            got = peft(input_ids=ids, attention_mask=mask).logits.float()
            error = (got - expected).abs().amax(dim=(1, 2))
            assert (error < 0.1 * (wrong - expected).abs().amax(dim=(1, 2))[[0, 1, 3]].min()).all(), error


def test_long_mixed_prefills_are_grouped_on_the_cpu_and_masked_on_a_gpu_up_to_a_bound(engine):
    """Where the arithmetic dominates (the CPU) a long mixed prefill computes each adapter's own
    rows; where kernel launches do (a GPU) the three-op masked path is kept until its hidden
    tensor passes GPU_MASKED_MAX_ELEMENTS."""
    with torch.no_grad():
        engine.make_resident([engine.registry.resolve(n) for n in ("a", "b", "small")])
    router = engine.router
    assert router.stacks.device.type == "cpu"
    cpu, columns = router.stacks.device, router.stacks.columns()
    assert not routing.use_groups(cpu, routing.KERNEL_MAX_ROWS, columns)
    assert routing.use_groups(cpu, routing.KERNEL_MAX_ROWS + 1, columns)
    rows_at_bound = routing.GPU_MASKED_MAX_ELEMENTS // columns
    cuda = torch.device("cuda")  # the policy reads only where the stacks live
    assert not routing.use_groups(cuda, 16 * 20, columns) and not routing.use_groups(cuda, rows_at_bound, columns)
    assert routing.use_groups(cuda, rows_at_bound + 1, columns)


def test_fixed_masks_route_alike_and_keep_their_storage(engine, monkeypatch):
    """What a replayed CUDA graph relies on (serve/slots.py): with fixed masks, the rows' masks are
    written into the same storage each time the rows are set, and the logits are unchanged."""
    names = ["a", "small", "base", "b"]
    ids, mask = batch(engine, len(names))
    routed_logits(engine, ids, mask, names)  # makes the adapters resident: the router now exists
    router = engine.router
    monkeypatch.setattr(router, "lora_add", None)  # the torch path, which a GPU runs
    expected = routed_logits(engine, ids, mask, names)
    version = router.version
    router.fix_masks(8)
    assert router.version > version  # captured steps from before would read freed buffers
    try:
        got = routed_logits(engine, ids, mask, names)
        storage = [m.data_ptr() for m in router.plan.masks]
        flipped = routed_logits(engine, ids, mask, list(reversed(names)))
        assert [m.data_ptr() for m in router.plan.masks] == storage
        assert router.signature() == ("mixed",)
        torch.testing.assert_close(got, expected)
        assert (flipped[0] - got[0]).abs().max() > 1e-3  # the rewritten masks took effect
        routed_logits(engine, ids[:2], mask[:2], ["small", "small"])
        assert router.signature() == ("single", router.keys.index(engine.registry.resolve("small").key))
        router.set_rows(router.keys[:2] * 5)  # more rows than the buffers hold: masks made as usual
        assert router.plan.preset_masks is None and router.plan.masks[0].shape[0] == 10
    finally:
        router.fix_masks(0)


def test_a_kernel_choice_is_checked_before_anything_loads():
    with pytest.raises(ValueError, match="'triton'.*auto, torch"):  # it left for bench/ (bench/lora_triton.py)
        routing.LoraRouter.check_kernel("triton")
    with pytest.raises(ValueError, match="'cuda'.*auto, torch"):
        Engine(None, None, lora_kernel="cuda")  # before any loading
    routing.LoraRouter.check_kernel("torch")


def test_the_server_offers_only_the_kernels_the_router_has(capsys):
    from serve.__main__ import main as serve_main

    with pytest.raises(SystemExit) as exit:
        serve_main(["--base", "no/such/base", "web", "--lora-kernel", "triton"])  # the base is never read
    assert exit.value.code == 2 and "argument --lora-kernel: invalid choice: 'triton'" in capsys.readouterr().err


def test_stacking_reads_the_weights_only_and_plans_name_their_path(engine, monkeypatch):
    """`stack_adapters` builds new tensors and leaves the weights it reads alone (the router's
    views stay on its own stacks); a plan is fixed once made, and the path each step takes is named."""
    names = ["a", "small", "base"]
    ids, mask = batch(engine, len(names))
    routed_logits(engine, ids, mask, names)
    router = engine.router
    key = router.keys[0]
    pair = next(iter(router.weights_of(key).pairs.values()))
    before = pair.A.data_ptr()
    fresh = routing.stack_adapters(router.named_layers(), list(router.keys), [router.weights_of(k) for k in router.keys],
                                   router.dtype)
    assert next(iter(router.weights_of(key).pairs.values())).A.data_ptr() == before  # still the router's stack
    assert fresh.keys == router.keys and fresh.rank == router.rank
    assert all(a.A.data_ptr() != b.A.data_ptr() for (_, a), (_, b) in zip(fresh.layers, router.stacks.layers))

    plan = router.set_rows([router.keys[0], None, router.keys[1]])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.indices = (0, 0, 0)
    assert plan.indices == (0, routing.BASE, 1) and plan.single is None
    monkeypatch.setattr(router, "lora_add", None)
    assert router.path_for(3) is routing.Path.MASKED
    assert router.path_for(routing.KERNEL_MAX_ROWS + 1) is routing.Path.GROUPED
    router.set_rows([router.keys[1]] * 2)
    assert router.path_for(2) is routing.Path.SINGLE and router.signature() == ("single", 1)
    router.set_rows([None, None])
    assert router.path_for(2) is routing.Path.BASE
    deterministic = dataclasses.replace(plan, per_row=True)
    assert routing.torch_path(deterministic, 3) is routing.Path.PER_ROW
    assert plan.per_row is False  # the original is untouched
    # The per-row path loops over the items' adapters on the host, so a captured step holds them:
    # another mix of the same width must not replay it.
    swapped = dataclasses.replace(deterministic, indices=(1, routing.BASE, 0))
    assert deterministic.signature() == ("per_row", (0, routing.BASE, 1)) != swapped.signature()
    assert plan.signature() == ("mixed",) == dataclasses.replace(plan, indices=(1, routing.BASE, 0)).signature()
