"""One request's fault stays its own: whatever one request or adapter does, its neighbours in the
same decode steps get their own answers, and the loop keeps serving."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import AdapterStore, BaseConfig, BaseShape, Message, load_base
from adapters.store import ADAPTER_WEIGHTS
from serve.engine import ChatRequest, Engine, RequestError, SamplingParams
from serve.registry import AdapterRegistry
from serve.slots import DecodeSettings
from tests.conftest import PROMPTS, new_engine, request, save_random_adapter, texts


@pytest.fixture
def store_with(tiny_base, tmp_path):
    """A fresh store with two good adapters, and its registry."""
    store = AdapterStore(tmp_path / "store")
    for i, name in enumerate(["good", "other"]):
        save_random_adapter(store, name, tiny_base, seed=40 + i)
    base = load_base(BaseConfig(str(tiny_base)))
    registry = AdapterRegistry(store, BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    return store, registry


def damage_after_registration(store: AdapterStore, name: str, how) -> None:
    """Rewrite an adapter's weights in place once the registry has accepted it: the load, not the
    registration, is what meets the damage (as with a file changed under a running server)."""
    path = store.path(name).resolve() / ADAPTER_WEIGHTS
    how(path)


def nan_weights(path) -> None:
    weights = load_file(str(path))
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(path))


def truncated(path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def neighbours(names=("good", "other", "base")) -> list[ChatRequest]:
    return [request(n, p) for n in names for p in PROMPTS[:2]]


@pytest.mark.parametrize("damage", [nan_weights, truncated], ids=["nan-weights", "truncated"])
@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_an_adapter_that_fails_to_load_fails_its_requests_alone(store_with, tiny_base, damage, kernel):
    """On the torch path the mixed step multiplies every slot's product by the row masks, where
    one slot's NaN would reach every row (0·NaN = NaN): non-finite weights never reach a slot."""
    store, registry = store_with
    save_random_adapter(store, "bad", tiny_base, seed=99)
    registry.refresh()
    engine = Engine(load_base(BaseConfig(str(tiny_base))), registry, max_loaded=4, lora_kernel=kernel,
                    decode=DecodeSettings(deterministic=True))
    try:
        expected = texts(engine, neighbours())
        engine.evict("good"), engine.evict("other")
        damage_after_registration(store, "bad", damage)
        results = engine.generate([request("bad", PROMPTS[0]), *neighbours(), request("bad", PROMPTS[1])], timeout=60)
        assert [r.error_code for r in (results[0], results[-1])] == ["adapter_unavailable"] * 2
        assert "'bad'" in results[0].error
        assert [r.text for r in results[1:-1]] == expected
        assert all(r.error is None for r in results[1:-1])
        assert not any(k.startswith("bad@") for k in engine.resident())  # nothing of it stays loaded
        assert not any(k.startswith("bad@") for k in engine.router.keys)
        assert texts(engine, neighbours()) == expected  # and later steps are unaffected
    finally:
        engine.close()


@pytest.mark.parametrize("content, where", [("hello \ud83d", "messages[0].content"), ("ok", None)])
def test_text_the_tokenizer_cannot_take_fails_alone(served, tiny_base, content, where):
    _, _, registry = served
    engine = new_engine(tiny_base, registry)
    try:
        expected = texts(engine, neighbours(("a", "base")))
        bad = ChatRequest("a", (Message("user", content),), SamplingParams(max_new_tokens=4))
        results = engine.generate([bad, *neighbours(("a", "base"))], timeout=60)
        assert [r.text for r in results[1:]] == expected
        if where is None:
            assert results[0].error is None
        else:
            assert results[0].error_code == "invalid_request_error" and where in results[0].error
            with pytest.raises(RequestError) as raised:
                engine.prepare(bad)
            assert raised.value.param == where
    finally:
        engine.close()


def test_a_template_that_raises_is_the_request_s_error(served, tiny_base, monkeypatch):
    _, _, registry = served
    engine = new_engine(tiny_base, registry)
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('no system turn here') }}{% endif %}{{ messages[0].content }}"
    monkeypatch.setattr(engine, "_template", lambda entry: template)
    try:
        with pytest.raises(RequestError, match="no system turn here"):
            engine.prepare(ChatRequest("a", (Message("system", "be brief"), Message("user", "hi"))))
    finally:
        engine.close()


@pytest.mark.parametrize("field, value", [("seed", 2**64), ("seed", -1), ("temperature", float("nan")),
                                          ("temperature", float("inf")), ("top_p", float("nan"))])
def test_sampling_parameters_out_of_range_name_their_field(field, value):
    with pytest.raises(RequestError) as raised:
        SamplingParams(**{field: value})
    assert raised.value.param == field and field in str(raised.value)


def test_the_largest_seed_samples(served, tiny_base):
    _, _, registry = served
    engine = new_engine(tiny_base, registry)
    try:
        runs = [texts(engine, [request("a", temperature=1.0, seed=2**64 - 1)])[0] for _ in range(2)]
    finally:
        engine.close()
    assert runs[0] == runs[1]


def test_non_finite_logits_fail_their_row_alone(served, tiny_base, monkeypatch):
    """A row whose logits hold NaN (a broken model or adapter) fails; the other rows sample and
    decode as usual in the same steps."""
    from serve.batcher import ContinuousBatcher

    _, _, registry = served
    engine = new_engine(tiny_base, registry)
    try:
        expected = texts(engine, [request("b", PROMPTS[1], temperature=1.0, seed=5), request("base", PROMPTS[1])])
        real = ContinuousBatcher._pick_tokens

        def poison_a(self, logits):
            rows = [i for i, seq in enumerate(self._running) if seq.request.adapter == "a"]
            logits = logits.clone()
            logits[rows] = float("nan")
            return real(self, logits)

        monkeypatch.setattr(ContinuousBatcher, "_pick_tokens", poison_a)
        results = engine.generate([request("a", temperature=1.0, seed=1), request("b", PROMPTS[1], temperature=1.0, seed=5),
                                   request("base", PROMPTS[1])], timeout=60)
    finally:
        engine.close()
    assert results[0].error_code == "server_error" and "non-finite" in results[0].error
    assert [r.text for r in results[1:]] == expected


def test_a_cancelled_request_ends_at_the_next_step(served, tiny_base):
    _, _, registry = served
    engine = new_engine(tiny_base, registry)
    try:
        stream = engine.submit(request("a", max_new_tokens=200))
        first = next(iter(stream))  # it runs
        stream.cancel()
        result = stream.wait(30)
        neighbour = texts(engine, [request("b")])
    finally:
        engine.close()
    assert first and result.error is None and result.new_tokens < 200
    assert neighbour[0] is not None


def test_closing_ends_every_request_it_holds(served, tiny_base):
    _, _, registry = served
    engine = new_engine(tiny_base, registry)
    streams = [engine.submit(request(n, max_new_tokens=200)) for n in ("a", "b", "base")]
    next(iter(streams[0]))
    engine.close()
    results = [s.wait(10) for s in streams]
    assert all(r is not None for r in results)
    assert all(r.error is None or r.error_code == "server_error" for r in results)


def test_permits_come_back_after_hostile_requests(two_adapters, tiny_base):
    """Requests that fail in every way the engine knows return their permits: a server with room
    for 4 still answers after 32 of them, and holds none afterwards."""
    from serve.service import BusyError
    from tests.conftest import start_service

    service = start_service(tiny_base, two_adapters, max_queue=4)
    try:
        hostile = [ChatRequest("colors", (Message("user", "hi \udc00"),)),
                   ChatRequest("nope", (Message("user", "hi"),)),
                   ChatRequest("base", (Message("user", "word " * 400),))]
        errors = 0
        for i in range(32):
            try:
                service.submit(hostile[i % len(hostile)]).wait(30)
            except (RequestError, KeyError, BusyError):
                errors += 1
        abandoned = [service.submit(request("sizes", max_new_tokens=200)) for _ in range(4)]
        for stream in abandoned:
            stream.cancel()
        [s.wait(30) for s in abandoned]
        done = threading.Event()
        answer = service.submit(request("colors", "Color of dog?"))
        answer.add_done_callback(lambda _: done.set())
        assert done.wait(30)
        assert errors == 32 and answer.result.text == "blue"
        assert service.requests_held() == 0
    finally:
        service.close()
