"""Per-request adapter mixes and strengths, against peft as the reference.

peft computes a mix with every named adapter active at once and each adapter's scaling
multiplied by its scale (`LoraLayer.set_scale`): that is the reference for every row here. The
router computes each row's own mix inside one batch whose other rows use other adapters, mixes or
the base, on every path it has; then the same through the server's API, against peft's
log-probabilities of the very tokens the API answered.
"""

from __future__ import annotations

import math
import shutil
import threading
from contextlib import nullcontext

import httpx
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

import serve.routing as routing
from adapters import BaseConfig, Message, load_base
from serve.engine import ChatRequest, SamplingParams
from serve.mixes import MixError, Part, make_mix, parse_mix
from serve.server import AccessConfig
from serve.slots import DecodeSettings
from tests.conftest import LiveServer, free_port, start_service
from tests import test_routing
from tests.test_routing import batch, shared_inputs

# test_routing's fixtures, bound here under their names so pytest finds them for this module's tests.
engine, mixed_ranks = test_routing.engine, test_routing.mixed_ranks

LOGIT_TOLERANCE = 1e-4
"""test_routing's bound for routed float32 logits against peft's (rounding of ~1e-6 on logits of
magnitude ~10, a margin of 100); a mix adds one or two more products of the same size per layer."""

LOGPROB_TOLERANCE = 1e-4
"""The API's log-probabilities against peft's teacher-forced ones on the 4-bit base: float32 over
the same dequantized weights, but the API's come from a KV-cached decode whose products group
the additions differently from one forward over the whole text. Measured up to 8e-6 on an EPYC
(2026-12-02); 1e-4, test_openai_surface's bound, leaves a margin of 12, and is 100 times smaller
than the differences the scales make (test_a_scaled_adapter_at_one_is_the_adapter...)."""

ROWS = [
    ["a", (("a", 0.5),), "base", (("a", 1.0), ("b", 1.0)), "small", (("small", -0.7), ("b", 0.3))],
    [(("a", 0.5),)] * 3,
    [(("b", 2.0), ("small", 1.0)), "b"],
]
"""Batches of rows: plain adapters, one adapter at a strength, two at once (with a negative scale),
all beside each other and the base; every row one mix; a mix beside its own plain part."""


def as_parts(row) -> tuple[tuple[str, float], ...]:
    if row == "base":
        return ()
    return ((row, 1.0),) if isinstance(row, str) else row


def peft_reference(tiny_base, store, ids, mask, rows) -> torch.Tensor:
    """Each row's logits from peft with that row's adapters active and scaled, on a fresh float32 base."""
    base = load_base(BaseConfig(str(tiny_base), quantize=False))
    model = PeftModel.from_pretrained(base.model, str(store.path("a")), adapter_name="a")
    for name in ("b", "small"):
        model.load_adapter(str(store.path(name)), adapter_name=name)
    out = torch.empty(len(rows), ids.shape[1], model.config.vocab_size)
    for item, row in enumerate(rows):
        out[item] = peft_forward(model, as_parts(row), ids, mask)[item]
    return out


def peft_forward(model: PeftModel, parts, ids, mask) -> torch.Tensor:
    """peft's logits with `parts`' adapters active, each at its scale (none active: the base)."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        if not parts:
            with model.disable_adapter():
                return model(input_ids=ids, attention_mask=mask).logits
        model.base_model.set_adapter([name for name, _ in parts])
        for layer in layers:
            for name, scale in parts:
                layer.set_scale(name, scale)
        try:
            return model(input_ids=ids, attention_mask=mask).logits
        finally:
            for layer in layers:
                for name, _ in parts:
                    layer.set_scale(name, 1.0)


def routed(engine, ids, mask, rows) -> torch.Tensor:
    keys = []
    entries = {n: engine.registry.resolve(n) for n in ("a", "b", "small")}
    for row in rows:
        parts = as_parts(row)
        if not parts:
            keys.append(None)
        elif isinstance(row, str):
            keys.append(entries[row].key)
        else:
            keys.append(tuple((entries[n].key, s) for n, s in parts))
    with torch.no_grad():
        engine.make_resident(list(entries.values()))
        return engine.route(keys)(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("rows", ROWS, ids=["mixed-batch", "one-mix", "mix-beside-its-part"])
@pytest.mark.parametrize("path", ["kernel", "masked", "grouped", "per_row", "shared-inputs"])
def test_every_path_computes_each_rows_mix_as_peft_does(engine, tiny_base, mixed_ranks, monkeypatch, rows, path):
    ids, mask = batch(engine, len(rows))
    expected = peft_reference(tiny_base, mixed_ranks, ids, mask, rows)
    routed(engine, ids, mask, rows)  # the router exists from here on
    router = engine.router
    if path == "per_row":  # the deterministic mode's plans (the kernel, where it applies, is off below)
        monkeypatch.setattr(router, "per_row", True)
        router.rebuild(list(router.keys))
    if path == "kernel":
        if shutil.which("c++") is None:
            pytest.skip("no C++ compiler to build the fused CPU kernel")
        assert router.lora_add is not None
    else:
        monkeypatch.setattr(router, "lora_add", None)
    if path == "grouped":
        monkeypatch.setattr(routing, "KERNEL_MAX_ROWS", 0)  # every batch counts as a long prefill
    with shared_inputs(router) if path == "shared-inputs" else nullcontext():
        got = routed(engine, ids, mask, rows)
        taken = router.path_for(ids.numel())
    if path == "per_row":
        monkeypatch.undo()
        router.rebuild(list(router.keys))
    want_path = {"kernel": routing.Path.KERNEL, "grouped": routing.Path.GROUPED, "per_row": routing.Path.PER_ROW}
    assert taken == want_path.get(path, routing.Path.MASKED)
    torch.testing.assert_close(got, expected, atol=LOGIT_TOLERANCE, rtol=LOGIT_TOLERANCE)


def test_scales_and_mixes_change_the_logits(engine, tiny_base, mixed_ranks):
    """The reference comparison above could pass with the scales ignored only if they changed nothing."""
    ids, mask = batch(engine, 4)
    got = routed(engine, ids, mask, ["a", (("a", 0.5),), (("a", 1.0), ("b", 1.0)), "b"])
    assert (got[1] - got[0]).abs().max() > 100 * LOGIT_TOLERANCE
    assert (got[2] - got[0]).abs().max() > 100 * LOGIT_TOLERANCE
    assert (got[2] - got[3]).abs().max() > 100 * LOGIT_TOLERANCE


def test_a_mix_spelling_reads_back_and_bad_ones_name_the_part():
    mix = parse_mix("json*0.5+sentiment")
    assert mix.parts == (Part("json", 0.5), Part("sentiment", 1.0)) and mix.spelling() == "json*0.5+sentiment"
    assert parse_mix("json*1").is_plain() and parse_mix("json@20261126-203000.1*0.25").parts[0].name == "json@20261126-203000.1"
    for spelling, says in (("json*x", "'x' is not a number"), ("json+json", "appears twice"), ("base*0.5", "'base'"),
                           ("json*9", "outside [-4, 4]"), ("json*nan", "outside"), ("../x*1", "not an adapter name"),
                           ("+".join(f"a{i}" for i in range(9)), "at most 8")):
        with pytest.raises(MixError, match=r"^model: .*" + says.replace("[", r"\[").replace("(", r"\(")):
            parse_mix(spelling)
    with pytest.raises(MixError) as err:
        make_mix([Part("a"), Part("a", 0.5)])
    assert err.value.param == "adapters[1].name"


# -- through the engine and the API ------------------------------------------------------------

@pytest.fixture(scope="module")
def live(tiny_base, two_adapters):
    # deterministic: a request's tokens are the same in any batch, so the batched API replies can be
    # set against the engine's own tokens for each alone (the masked path is checked above)
    service = start_service(tiny_base, two_adapters, decode=DecodeSettings(deterministic=True))
    with LiveServer(service, AccessConfig("127.0.0.1", free_port())) as server:
        yield server


@pytest.fixture(scope="module")
def reference_model(tiny_base, two_adapters, live):
    """peft over the same 4-bit base the server loads, with both trained adapters."""
    base = load_base(BaseConfig(str(tiny_base), quantize=live.service.config.quantize))
    model = PeftModel.from_pretrained(base.model, str(two_adapters.path("colors")), adapter_name="colors")
    model.load_adapter(str(two_adapters.path("sizes")), adapter_name="sizes")
    return model.eval()


def peft_logprobs(service, model, parts, prompt: str, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's teacher-forced log-probabilities of `tokens` after the prompt, and its likeliest at each."""
    prompt_ids = service.engine.prepare(ChatRequest(parts[0][0], (Message("user", prompt),))).prompt
    ids = torch.tensor([prompt_ids + tokens])
    logits = peft_forward(model, parts, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1 : -1]
    logprobs = torch.log_softmax(logits.float(), -1)
    return logprobs[torch.arange(len(tokens)), torch.tensor(tokens)], logprobs.max(-1).values


CASES = [
    ("colors", {"model": "colors"}, (("colors", 1.0),)),
    ("colors*0.4", {"model": "colors*0.4"}, (("colors", 0.4),)),
    ("colors*0.6+sizes*0.8", {"model": "base", "adapters": [{"name": "colors", "scale": 0.6}, {"name": "sizes", "scale": 0.8}]},
     (("colors", 0.6), ("sizes", 0.8))),
    ("sizes+colors*-0.5", {"model": "sizes+colors*-0.5"}, (("sizes", 1.0), ("colors", -0.5))),
]
"""(what the reply's `model` says, the request's model fields, the peft reference's active adapters)."""


def test_mixes_through_the_api_inside_one_batch_match_peft(live, reference_model):
    """All requests in flight together (with plain-adapter and base neighbours); each reply's tokens
    are peft's greedy choices for its own mix, and their log-probabilities peft's."""
    prompts = ["Color of cat?", "Size of dog?"]
    bodies = [(name, fields, parts, prompt) for name, fields, parts in CASES for prompt in prompts]
    bodies += [("base", {"model": "base"}, (), p) for p in prompts]
    replies: list = [None] * len(bodies)

    def send(i: int, fields: dict, prompt: str) -> None:
        body = {**fields, "messages": [{"role": "user", "content": prompt}], "max_tokens": 5, "temperature": 0,
                "logprobs": True}
        replies[i] = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120)

    threads = [threading.Thread(target=send, args=(i, f, p)) for i, (_, f, _, p) in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (name, _, parts, prompt), reply in zip(bodies, replies):
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert data["model"] == name
        content = data["choices"][0]["logprobs"]["content"]
        # The deterministic mode answers a request alone as in any batch: the engine's own call
        # gives the reply's token ids, which the API shows only as text.
        token_ids, text = token_ids_of(live.service, name, prompt)
        assert len(content) == len(token_ids) and data["choices"][0]["message"]["content"] == text
        if not parts:
            continue
        got = torch.tensor([c["logprob"] for c in content])
        want, best = peft_logprobs(live.service, reference_model, parts, prompt, token_ids)
        assert (got - want).abs().max() < LOGPROB_TOLERANCE, (name, prompt, got, want)
        assert (best - want).max() < LOGPROB_TOLERANCE, f"{name}: a reply token is not peft's greedy choice"


def token_ids_of(service, adapter: str, prompt: str) -> tuple[list[int], str]:
    """The reply's token ids and text, from the engine directly."""
    result = service.chat(adapter, [Message("user", prompt)], SamplingParams(max_new_tokens=5, logprobs=0)).wait(60)
    assert result.error is None, result.error
    return [t.token for t in result.logprobs], result.text


def test_a_scaled_adapter_at_one_is_the_adapter_and_the_scales_show(live):
    def answer(model: str) -> tuple[str, float]:
        body = {"model": model, "messages": [{"role": "user", "content": "Color of cat?"}], "max_tokens": 3,
                "temperature": 0, "logprobs": True}
        reply = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).json()
        return reply["choices"][0]["message"]["content"], reply["choices"][0]["logprobs"]["content"][0]["logprob"]

    plain, at_one = answer("colors"), answer("colors*1")
    assert plain == at_one and plain[0] == "red"
    weaker = answer("colors*0.3")
    assert weaker[1] < plain[1] - 100 * LOGPROB_TOLERANCE  # a weaker adapter is less sure of its answer


def test_bad_mixes_are_a_400_or_404_naming_the_field(live):
    def post(fields: dict) -> httpx.Response:
        body = {**fields, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        return httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)

    for fields, status, param in (({"model": "colors*x"}, 400, "model"), ({"model": "colors+nope"}, 404, "model"),
                                  ({"model": "sizes", "adapters": [{"name": "colors"}]}, 400, "model"),
                                  ({"model": "base", "adapters": [{"name": "colors", "scale": 9}]}, 400, "adapters[0].scale"),
                                  ({"model": "base", "adapters": [{"name": "colors"}, {"name": "colors"}]}, 400,
                                   "adapters[1].name")):
        reply = post(fields)
        assert reply.status_code == status, (fields, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param, (fields, error)
    assert "nope" in post({"model": "colors+nope"}).json()["error"]["message"]
    assert post({"model": "colors"}).status_code == 200  # and the server serves on


def test_scores_of_a_reply_are_its_own_logprobs(live):
    """Engine.score (the token view's base side) gives the logprobs generation reported, for a mix too."""
    service = live.service
    for adapter in ("colors", "colors*0.6+sizes*0.8"):
        result = service.chat(adapter, [Message("user", "Size of dog?")], SamplingParams(max_new_tokens=4, logprobs=2)).wait(60)
        tokens = [t.token for t in result.logprobs]
        scored = service.engine.score(adapter, [Message("user", "Size of dog?")], tokens, top=2)
        assert [s.token for s in scored] == tokens
        for own, again in zip(result.logprobs, scored):
            assert math.isclose(own.logprob, again.logprob, abs_tol=LOGPROB_TOLERANCE)
            assert [t for t, _ in own.top] == [t for t, _ in again.top]


def test_a_mixs_metrics_label_names_its_adapters_without_scales():
    """Free-valued scales would otherwise make a new Prometheus series per request."""
    from serve.metrics import adapter_label

    assert adapter_label("json*0.5+sentiment*0.25") == adapter_label("json*0.7+sentiment") == "json+sentiment"
    assert adapter_label("json") == "json" and adapter_label("json@20261126-203000.1") == "json@20261126-203000.1"
