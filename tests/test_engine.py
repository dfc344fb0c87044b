"""The serving engine on a tiny 4-bit base with adapters that are not no-ops."""

from __future__ import annotations

import shutil
import threading
import time

from adapters import AdapterStore, BaseShape, Message
from serve.engine import AdapterCache, ChatRequest, SamplingParams
from serve.registry import AdapterRegistry
from tests.conftest import PROMPTS, new_engine, random_adapter, request, save_random_adapter, texts

def test_mixed_batch_equals_each_request_alone(served, tiny_base):
    _, _, registry = served
    engine = new_engine(tiny_base, registry, 4)
    batch = [request(name, prompt) for name in ("base", "a", "b") for prompt in PROMPTS[:2]]
    together = texts(engine, batch)
    alone = [texts(engine, [r])[0] for r in batch]
    assert together == alone
    assert len(set(together[0::2])) == 3  # base, a and b answer differently: the adapters act


def test_swapping_a_b_a_gives_a_again(served, tiny_base):
    _, _, registry = served
    engine = new_engine(tiny_base, registry, 1)
    first = texts(engine, [request("a", p) for p in PROMPTS])
    other = texts(engine, [request("b", p) for p in PROMPTS])
    again = texts(engine, [request("a", p) for p in PROMPTS])
    assert first == again and first != other


def test_lru_holds_exactly_the_expected_adapters(served, tiny_base):
    _, _, registry = served
    engine = new_engine(tiny_base, registry, 2)
    key = {e.name: e.key for e in registry.servable()}
    steps = [("a", ["a"]), ("b", ["a", "b"]), ("a", ["b", "a"]), ("c", ["a", "c"]), ("d", ["c", "d"]), ("c", ["d", "c"])]
    for name, expected in steps:
        texts(engine, [request(name)])
        assert engine.resident() == [key[n] for n in expected], name
    assert engine.loads_from_disk == 4  # a, b, c, d once each; reloads came from host memory


def test_cache_never_evicts_a_pinned_adapter():
    cache = AdapterCache(1)
    cache.touch("x")
    cache.touch("y")
    assert cache.evictions(pinned={"x", "y"}) == [] and cache.resident() == ["x", "y"]
    assert cache.evictions(pinned={"y"}) == ["x"]
    assert cache.touch("y") is True and cache.touch("z") is False


def test_32_threads_get_their_own_adapters_answers(served, tiny_base):
    """32 concurrent clients, each sending [base, a, b, c, d]; each gets what the same request
    gets when nothing else runs. (Batch-composition equality is the mixed-batch test above;
    comparing against the same batch here keeps float near-ties of random adapters out of a
    test about isolation between concurrent requests.)"""
    _, _, registry = served
    engine = new_engine(tiny_base, registry, 4)
    names = ["base", "a", "b", "c", "d"]
    isolated = {p: texts(engine, [request(n, p) for n in names]) for p in PROMPTS}
    assert all(len(set(v)) == 5 for v in isolated.values())  # five different answers per prompt
    failures, lock = [], threading.Lock()

    def client(k: int) -> None:
        prompt = PROMPTS[k % len(PROMPTS)]
        order = names[k % 5 :] + names[: k % 5]  # rotate so rows land in different batch slots
        got = dict(zip(order, texts(engine, [request(n, prompt) for n in order])))
        if [got[n] for n in names] != isolated[prompt]:
            with lock:
                failures.append((k, got))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and failures == []


def test_errors_end_only_their_own_request(served, tiny_base):
    _, _, registry = served
    engine = new_engine(tiny_base, registry, 4)
    results = engine.generate([request("a"), request("nope"), request("base", "word " * 300), request("b")])
    assert results[1].error.startswith("unknown adapter 'nope'") and "available: base, a, b, c, d" in results[1].error
    assert "fills the model's context of 256 tokens" in results[2].error
    assert results[0].error is None and results[3].error is None and results[0].text == texts(engine, [request("a")])[0]
    capped = engine.generate([ChatRequest("a", (Message("user", "hi"),), SamplingParams(max_new_tokens=10_000))])[0]
    assert capped.error is None and capped.new_tokens <= engine.limits.max_new_tokens


def test_hot_load_and_replace_without_reloading_the_base(served, tiny_base, monkeypatch):
    store, _, registry = served
    engine = new_engine(tiny_base, registry, 8)
    versions = [random_adapter(tiny_base, 99), random_adapter(tiny_base, 100)]
    calls = []
    monkeypatch.setattr("adapters.base.AutoModelForCausalLM.from_pretrained", lambda *a, **k: calls.append(a))
    registry.watch(interval_s=0.1)
    try:
        save_random_adapter(store, "fresh", tiny_base, 0, model=versions[0])
        deadline = time.monotonic() + 2
        while "fresh" not in registry.available() and time.monotonic() < deadline:
            time.sleep(0.05)
        first = texts(engine, [request("fresh", p) for p in PROMPTS])
        assert time.monotonic() <= deadline
        save_random_adapter(store, "fresh", tiny_base, 0, model=versions[1])  # a new version, same name
        deadline = time.monotonic() + 2
        old_key = registry.resolve("fresh").key
        while registry.resolve("fresh").key == old_key and time.monotonic() < deadline:
            time.sleep(0.05)
        second = texts(engine, [request("fresh", p) for p in PROMPTS])
    finally:
        registry.close()
        store.delete("fresh")
        registry.refresh()
    assert first != second
    assert calls == []  # the base was never loaded again
    assert "fresh" not in registry.available()


def test_rejected_adapters_have_reasons_and_the_rest_keep_serving(served, tiny_base, other_base, tmp_path):
    store, base, _ = served
    bad = AdapterStore(tmp_path / "store")
    shutil.copytree(store.path("a"), bad.root / "good")
    save_random_adapter(bad, "wrong-base", other_base, seed=1)
    for name, damage in (("corrupt", "garbage"), ("pickled", "bin")):
        shutil.copytree(store.path("a"), bad.root / name)
        if damage == "garbage":
            (bad.root / name / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
        else:
            (bad.root / name / "adapter_model.bin").write_bytes(b"pickle")
    shutil.copytree(store.path("a"), bad.root / "x..y")  # a name that could be a path
    registry = AdapterRegistry(bad, BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    reasons = {r.name: r.reason for r in registry.rejected()}
    assert set(reasons) == {"wrong-base", "corrupt", "pickled", "x..y"}
    assert "LoRA shapes give" in reasons["wrong-base"]
    assert "not a readable safetensors" in reasons["corrupt"]
    assert "pickled weights" in reasons["pickled"]
    assert "not paths" in reasons["x..y"]
    engine = new_engine(tiny_base, registry)
    results = engine.generate([request("good"), request("pickled")])
    assert results[0].error is None and "rejected: pickled weights" in results[1].error



def test_each_resident_adapter_is_held_once_on_the_device(served, tiny_base):
    """The router's stacks are the only copy of the served adapters: peft's layers hold just the
    rank-1 adapter that made them (`Engine._wrap`), and an evicted adapter's weights come back
    intact from host memory."""
    import torch

    from serve.engine import WRAPPERS

    _, _, registry = served
    engine = new_engine(tiny_base, registry, max_loaded=3)
    batch = [request(n, PROMPTS[1]) for n in ("a", "b", "c")]  # PROMPTS[0] has a near-tie for a (see test_batcher)
    before = texts(engine, batch)
    stacked = expected = 0
    for layer in engine.router.layers():
        stacked += sum(t.untyped_storage().nbytes() for t in (layer._stacks.A, layer._stacks.Bt))
        base = layer.get_base_layer()
        expected += 3 * 4 * (base.in_features + base.out_features) * 4  # three adapters of rank 4, float32
        assert all(k.startswith(WRAPPERS) and layer.r[k] == 1 for k in layer.lora_A)
    assert stacked == expected
    pairs = engine.router.weights_of(engine.router.keys[0]).pairs  # views into the stacks, not copies
    assert pairs and all(pairs[name].B.untyped_storage().data_ptr() == layer._stacks.Bt.untyped_storage().data_ptr()
                         for name, layer in engine.router.named_layers() if name in pairs)
    engine.evict("a")  # to host memory and back: the same answers
    assert texts(engine, batch) == before
    assert all(p.A.dtype == torch.float32 for key in engine.router.keys for p in engine.router.weights_of(key).pairs.values())


def test_unload_finds_an_adapter_whose_name_has_a_dot(served, tiny_base):
    """Keys escape '.', so the engine maps keys back to names itself."""
    store, _, registry = served
    save_random_adapter(store, "x.v1", tiny_base, seed=7)
    registry.refresh()
    try:
        engine = new_engine(tiny_base, registry)
        texts(engine, [request("x.v1", PROMPTS[1])])
        assert engine.resident_names() == {"x.v1"}
        assert engine.evict("x.v1") is True and engine.resident_names() == set()
    finally:
        store.delete("x.v1")
        registry.refresh()
