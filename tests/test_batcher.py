"""Iteration-level batching: requests join a running batch, stream, and get their own answers."""

from __future__ import annotations

import time

import pytest
import torch

from serve.batcher import ContinuousBatcher, GrowingKV, StaticKV
from serve.slots import DecodeSettings
from tests.conftest import PROMPTS, new_engine, request, texts

CACHES = {"dynamic": DecodeSettings(), "static": DecodeSettings(static_cache=True, context=48),
          "deterministic": DecodeSettings(deterministic=True, context=48)}


@pytest.fixture(params=CACHES)
def batcher(served, tiny_base, request):
    """Each test runs with each cache: the growing one, the static slots a GPU replays captured
    steps on (here run eagerly), and the deterministic mode's full-width slots. The engine's own
    loop, which gives the reference answers (a request alone), runs with the same settings.

    The random adapters here emit byte garbage whose top two tokens are often within float noise
    of each other, so only the deterministic mode promises the same text whatever the batch: the
    tests that compare text across batch shapes run there, or on trained adapters
    (`test_trained_adapters_answer_alike_in_every_mode`)."""
    _, _, registry = served
    engine = new_engine(tiny_base, registry, 4, decode=CACHES[request.param])
    batcher = ContinuousBatcher(engine, decode=CACHES[request.param])
    yield engine, batcher
    batcher.close()
    engine.close()


@pytest.fixture
def exact(served, tiny_base):
    """The deterministic mode, where a request's text is the same whatever the batch holds."""
    _, _, registry = served
    settings = CACHES["deterministic"]
    engine = new_engine(tiny_base, registry, 4, decode=settings)
    batcher = ContinuousBatcher(engine, decode=settings)
    yield engine, batcher
    batcher.close()
    engine.close()


def test_each_request_gets_what_the_engine_gives_it_alone(exact):
    """Five adapters' rows (the base among them) over every prompt in one batch: bit for bit what
    each gets alone, near-ties included."""
    engine, batcher = exact
    requests = [request(n, p) for n in ("base", "a", "b", "c", "d") for p in PROMPTS]
    expected = [texts(engine, [r])[0] for r in requests]
    streams = [batcher.submit(r) for r in requests]
    results = [s.wait(60) for s in streams]
    assert [r.error for r in results] == [None] * len(requests)
    assert [r.text for r in results] == expected
    assert batcher.steps < sum(max(1, r.new_tokens) for r in results)  # rows shared decode steps


def test_a_request_joins_a_running_batch_and_streams(exact):
    engine, batcher = exact
    long = request("a", PROMPTS[3], max_new_tokens=12)
    short = request("b", PROMPTS[1])
    long_stream = batcher.submit(long)
    deadline = time.monotonic() + 30
    while batcher.steps < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    short_stream = batcher.submit(short)
    pieces = list(short_stream)
    short_result = short_stream.wait(60)
    long_result = long_stream.wait(60)
    assert "".join(pieces).strip() == short_result.text == texts(engine, [short])[0]
    assert long_result.text == texts(engine, [long])[0]
    if long_result.new_tokens > 6:  # the long one was still generating when the short one joined
        assert batcher.steps < long_result.new_tokens + short_result.new_tokens


def test_a_bad_request_fails_alone(exact):
    engine, batcher = exact
    good, bad = batcher.submit(request("a")), batcher.submit(request("nope"))
    assert bad.wait(60).error.startswith("unknown adapter 'nope'")
    assert good.wait(60).text == texts(engine, [request("a")])[0]


def test_sampling_with_a_seed_is_reproducible(batcher):
    _, batcher = batcher
    sampled = [batcher.generate(request("a", PROMPTS[0], temperature=1.0, top_p=0.9, top_k=50, seed=7), 60).text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_greedy_rows_sharing_steps_with_a_sampled_row_keep_their_answers(exact):
    """All-greedy steps pick tokens on the model's device; a step with a sampled row picks every
    row on the host. Both ways give each greedy row the engine's own answer."""
    engine, batcher = exact
    greedy = [request(n, PROMPTS[1]) for n in ("a", "b")]
    sampled = request("c", PROMPTS[2], temperature=1.0, seed=3)
    runs = []
    for _ in range(2):
        streams = [batcher.submit(r) for r in [*greedy, sampled]]
        runs.append([s.wait(60) for s in streams])
    for results in runs:
        assert [r.error for r in results] == [None] * 3
        assert [r.text for r in results[:2]] == texts(engine, greedy)
    assert runs[0][2].text == runs[1][2].text  # the sampled row follows its own seeded generator
    assert runs[0][2].text != texts(engine, [request("c", PROMPTS[2])])[0]  # and was sampled, not argmaxed


def test_a_replaced_adapter_serves_new_requests_while_running_ones_finish_on_the_old(served, tiny_base):
    from tests.conftest import random_adapter, save_random_adapter

    store, _, registry = served
    versions = [random_adapter(tiny_base, 201), random_adapter(tiny_base, 202)]
    save_random_adapter(store, "swap", tiny_base, 0, model=versions[0])
    registry.refresh()
    engine = new_engine(tiny_base, registry, 4)
    batcher = ContinuousBatcher(engine, decode=engine.decode)
    try:
        old_request = request("swap", PROMPTS[2], max_new_tokens=12)
        expected_old = texts(engine, [old_request])[0]
        running = batcher.submit(old_request)
        deadline = time.monotonic() + 30
        while batcher.steps < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        save_random_adapter(store, "swap", tiny_base, 0, model=versions[1])
        registry.refresh()
        new_result = batcher.generate(request("swap", PROMPTS[2], max_new_tokens=12), 60)
        old_result = running.wait(60)
        expected_new = texts(engine, [request("swap", PROMPTS[2], max_new_tokens=12)])[0]
    finally:
        batcher.close()
        store.delete("swap")
        registry.refresh()
    assert old_result.text == expected_old
    assert new_result.text == expected_new != expected_old


def test_stop_strings_end_the_reply(exact):
    engine, batcher = exact
    full = texts(engine, [request("b", PROMPTS[1], max_new_tokens=12)])[0]
    assert len(full) >= 6
    stop = full[3:5]
    expected = full[: full.index(stop)].strip()
    assert texts(engine, [request("b", PROMPTS[1], max_new_tokens=12, stop=(stop,))])[0] == expected
    assert batcher.generate(request("b", PROMPTS[1], max_new_tokens=12, stop=(stop,)), 60).text == expected


def test_ignore_eos_runs_past_a_stop_token_to_the_budget(exact):
    """vLLM's `ignore_eos`: the token that would end the reply is kept, and the reply runs to
    max_new_tokens; without it the same request ends there."""
    engine, batcher = exact
    full = batcher.generate(request("b", PROMPTS[1], max_new_tokens=8, logprobs=0), 60)
    assert full.error is None and full.new_tokens == 8
    tokens = [t.token for t in full.logprobs]
    stop = tokens[2]
    batcher.stop_ids = batcher.stop_ids | {stop}  # as if the base's end of turn were that token
    cut = batcher.generate(request("b", PROMPTS[1], max_new_tokens=8, logprobs=0), 60)
    assert [t.token for t in cut.logprobs] == tokens[: tokens.index(stop)] and cut.finish_reason == "stop"
    kept = batcher.generate(request("b", PROMPTS[1], max_new_tokens=8, logprobs=0, ignore_eos=True), 60)
    assert [t.token for t in kept.logprobs] == tokens and kept.finish_reason == "length"


def test_a_failing_step_fails_its_requests_and_the_loop_keeps_serving(batcher, monkeypatch):
    engine, batcher = batcher
    real = engine.make_resident
    calls = []

    def fail_once(entries):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real(entries)

    monkeypatch.setattr(engine, "make_resident", fail_once)
    failed = batcher.generate(request("a"), 60)
    assert failed.error == "device lost"
    assert batcher.generate(request("a"), 60).text == texts(engine, [request("a")])[0]


def test_the_decode_loop_measures_its_threads_once_per_engine(served, tiny_base):
    import torch

    _, _, registry = served
    engine = new_engine(tiny_base, registry, 2)
    first = ContinuousBatcher(engine)
    first.wait_ready()
    assert engine.decode_threads in {1, torch.get_num_threads()}
    first.close()
    second = ContinuousBatcher(engine, threads=None)
    second.wait_ready()
    assert second.threads == engine.decode_threads  # reused, not measured again
    assert second.generate(request("a", PROMPTS[1]), timeout=60).error is None
    second.close()
    pinned = ContinuousBatcher(engine, threads=1)
    pinned.wait_ready()
    assert pinned.threads == 1
    pinned.close()


def test_the_static_cache_serves_from_its_slots_and_caps_replies_to_fit_them(served, tiny_base, monkeypatch):
    from serve.slots import SlotCache

    _, _, registry = served
    engine = new_engine(tiny_base, registry, 4)
    batcher = ContinuousBatcher(engine, decode=DecodeSettings(static_cache=True, context=24))
    steps = []
    real_step = SlotCache.step
    monkeypatch.setattr(SlotCache, "step", lambda self, model, rows: steps.append(rows) or real_step(self, model, rows))
    try:
        prompt_tokens = batcher.generate(request("a", PROMPTS[1], max_new_tokens=2), 60).prompt_tokens
        capped = batcher.generate(request("b", PROMPTS[1], max_new_tokens=200), 60)
        too_long = batcher.generate(request("a", "word " * 40), 60)
        mixed = [batcher.submit(request(n, PROMPTS[2], max_new_tokens=4)) for n in ("base", "a", "b")]
        mixed = [s.wait(60) for s in mixed]
    finally:
        batcher.close()
    assert steps and set(steps) <= {1, 2, 4}  # every decode step ran on the slots, in power-of-two buckets
    assert capped.error is None and capped.finish_reason == "length" and capped.new_tokens == 24 - prompt_tokens
    assert "static decode cache's context of 24 tokens" in too_long.error and too_long.error_code == "context_length_exceeded"
    assert [r.error for r in mixed] == [None] * 3 and all(r.new_tokens == 4 for r in mixed)


def test_a_step_that_cannot_be_captured_falls_back_to_eager_steps(served, tiny_base, monkeypatch):
    """A stack that refuses a CUDA graph capture must not fail requests: the loop logs it, stops
    capturing and serves the same steps eagerly (here the capture is made to fail on the CPU)."""
    from serve.slots import StepGraphs

    _, _, registry = served
    settings = DecodeSettings(deterministic=True, context=48)
    engine = new_engine(tiny_base, registry, 4, decode=settings)
    batcher = ContinuousBatcher(engine, decode=settings)

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraphs, "run", refuse)
    batcher.kv.graphs = StepGraphs()  # as on a GPU
    try:
        results = [s.wait(60) for s in [batcher.submit(request(n, PROMPTS[1])) for n in ("a", "b")]]
    finally:
        batcher.close()
    assert [r.error for r in results] == [None, None]
    assert [r.text for r in results] == texts(engine, [request(n, PROMPTS[1]) for n in ("a", "b")])
    assert batcher.kv.graphs is None and "stream is capturing" in batcher.kv.graph_error


def test_the_static_slots_are_the_default_where_steps_replay_as_cuda_graphs(served, tiny_base):
    """Measured on an H100 (8B shape): with replayed steps the adapters cost about 8% of the base's
    throughput, eagerly 36-42%. The slots' mask needs SDPA; asked for or refused, the setting wins."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = DecodeSettings()
    assert auto.uses_static_cache(cuda, "sdpa") and not auto.uses_static_cache(cpu, "sdpa")
    assert not auto.uses_static_cache(cuda, "eager")  # another attention keeps the growing cache
    assert not DecodeSettings(capture_graphs=False).uses_static_cache(cuda, "sdpa")
    assert not DecodeSettings(static_cache=False).uses_static_cache(cuda, "sdpa")
    assert DecodeSettings(static_cache=True).uses_static_cache(cpu, "sdpa")
    _, _, registry = served
    batcher = ContinuousBatcher(new_engine(tiny_base, registry, 4))  # the default, on the CPU
    try:
        assert isinstance(batcher.kv, GrowingKV)
    finally:
        batcher.close()


def test_default_slots_that_would_crowd_the_device_leave_the_growing_cache(served, tiny_base, monkeypatch, caplog):
    """Chosen by default, the slots take at most half the free memory (a 13B model without grouped
    KV heads would need 27 GB of them); asked for, they are allocated whatever they cost."""
    import serve.batcher as batcher_module
    from serve.slots import SlotCache

    _, _, registry = served
    engine = new_engine(tiny_base, registry, 4)
    model, dtype = engine.base.model, engine.base.model.get_input_embeddings().weight.dtype
    slots = SlotCache.for_model(model, 4, 24, dtype, torch.device("cpu"))
    held = sum(t.numel() * t.element_size() for t in slots.keys + slots.values)
    assert SlotCache.bytes_for(model, 4, 24, dtype) == held
    monkeypatch.setattr(DecodeSettings, "uses_static_cache", lambda self, device, attention: True)  # as on a GPU
    need = SlotCache.bytes_for(model, 4, 48, dtype)
    for free, asked, kept in ((2 * need, None, True), (2 * need - 1, None, False), (0, True, True)):
        monkeypatch.setattr(batcher_module, "device_free_bytes", lambda device: free)
        batcher = ContinuousBatcher(engine, max_batch=4, decode=DecodeSettings(static_cache=asked, context=48))
        try:
            assert isinstance(batcher.kv, StaticKV) == kept, (free, asked)
        finally:
            batcher.close()
    assert "keeping the growing KV cache" in caplog.text


@pytest.mark.parametrize("mode", CACHES)
def test_trained_adapters_answer_alike_in_every_mode(mode, two_adapters, tiny_base):
    """Adapters trained to clear margins give their own answers in one mixed batch with the base,
    whatever the cache: the same words as each alone, and the words they were trained on."""
    from adapters import AdapterStore, BaseConfig, BaseShape, load_base
    from serve.registry import AdapterRegistry
    from tests.conftest import ANIMAL_COLORS, ANIMAL_SIZES

    base = load_base(BaseConfig(str(tiny_base)))
    registry = AdapterRegistry(AdapterStore(two_adapters.root), BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    engine = new_engine(tiny_base, registry, 4, decode=CACHES[mode])
    try:
        asks = [request("colors", f"Color of {a}?") for a in ANIMAL_COLORS] + [request("sizes", f"Size of {a}?") for a in ANIMAL_SIZES]
        asks.append(request("base", "Color of cat?"))
        alone = [texts(engine, [r])[0] for r in asks]
        together = texts(engine, asks)
    finally:
        engine.close()
    assert together == alone
    assert together[:-1] == [*ANIMAL_COLORS.values(), *ANIMAL_SIZES.values()]


def test_a_vanishing_temperature_samples_the_likeliest_token_instead_of_failing(served, tiny_base):
    """Found by the schemathesis run: temperature 8e-187 made logits / temperature infinite and
    the sampler's probabilities NaN. Sampling at any temperature that small is greedy decoding."""
    _, _, registry = served
    engine = new_engine(tiny_base, registry)
    try:
        greedy, tiny = engine.generate([request("a", PROMPTS[1]), request("a", PROMPTS[1], temperature=1e-300, seed=1)])
    finally:
        engine.close()
    assert tiny.error is None and tiny.text == greedy.text
