"""The rest of OpenAI's surface, through the official `openai` client against a live server:
text parts, log-probabilities, n choices, usage in streams, JSON output by grammar, raw completions."""

from __future__ import annotations

import json
import math
import threading

import httpx
import openai
import pytest
import torch

from adapters import Message
from serve.engine import ChatRequest, SamplingParams
from serve.server import AccessConfig
from serve.slots import DecodeSettings
from tests.conftest import ANIMAL_COLORS, LiveServer, free_port, start_service

KEY = "surface-key"
CAT = [{"role": "user", "content": "Color of cat?"}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "size", "ok"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["small", "big", "tiny"]},
                         "ok": {"type": "boolean"}}}
"""Every value an enum or a boolean: the JSON is complete within a few tokens whatever the model prefers."""

LOGPROB_TOLERANCE = 1e-4
"""The API's log-probabilities against a forward pass of our own: both float32 over the same
weights, the same prompt alone in its batch; logits of magnitude ~10 carry rounding of ~1e-6
(float32's 1.2e-7 relative), and a log-softmax adds a few of those: 1e-4 leaves a margin of 10."""


@pytest.fixture(scope="module")
def live(tiny_base, two_adapters):
    # deterministic: a request's answer does not depend on its neighbours, so batched and alone compare exactly
    service = start_service(tiny_base, two_adapters, decode=DecodeSettings(deterministic=True))
    with LiveServer(service, AccessConfig("127.0.0.1", free_port(), (), KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def direct(service, adapter: str, prompt: str, **params) -> str:
    result = service.chat(adapter, [Message("user", prompt)], SamplingParams(**{"max_new_tokens": 8, **params})).wait(60)
    assert result.error is None, result.error
    return result.text


def test_content_as_text_parts_is_the_joined_text_and_other_parts_are_a_400_naming_the_part(live, client):
    parts = [{"type": "text", "text": "Color of "}, {"type": "text", "text": "cat?"}]
    reply = client.chat.completions.create(model="colors", messages=[{"role": "user", "content": parts}], max_tokens=8,
                                           temperature=0)
    assert reply.choices[0].message.content == direct(live.service, "colors", "Color of cat?") == "red"
    image = parts[:1] + [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="colors", messages=[{"role": "user", "content": image}])
    error = err.value.body
    assert error["param"] == "messages[0].content" and "part [1]" in error["message"] and "image_url" in error["message"]


def reference_logprobs(service, adapter: str, prompt: str) -> torch.Tensor:
    """The first reply token's log-softmax, from a forward pass of our own over the adapter."""
    engine = service.engine
    prepared = engine.prepare(ChatRequest(adapter, (Message("user", prompt),)))
    with engine.lock, torch.no_grad():
        engine.make_resident([prepared.entry])
        logits = engine.route([prepared.entry.key])(input_ids=torch.tensor([prepared.prompt])).logits[0, -1]
    return torch.log_softmax(logits.float(), -1)


def test_logprobs_are_the_models_own_with_the_likeliest_alternatives(live, client):
    reply = client.chat.completions.create(model="colors", messages=CAT, max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content).strip() == choice.message.content == "red"
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3 and bytes(item.bytes).decode() == item.token
        tops = [t.logprob for t in item.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(math.exp(t) for t in tops) <= 1 + 1e-6
        assert item.logprob == tops[0] and item.token == item.top_logprobs[0].token  # greedy: the likeliest
    want = reference_logprobs(live.service, "colors", "Color of cat?").topk(3)
    got = torch.tensor([t.logprob for t in content[0].top_logprobs])
    assert (got - want.values).abs().max() < LOGPROB_TOLERANCE
    tokenizer = live.service.base.tokenizer
    assert [t.token.strip() for t in content[0].top_logprobs] == [tokenizer.decode([i]).strip() for i in want.indices]


def test_n_choices_are_rows_of_one_batch_each_sampled_as_its_own_seed(live, client):
    # the base, whose untrained answers vary with the draw, so that each choice's seed shows
    many = client.chat.completions.create(model="base", messages=CAT, max_tokens=6, temperature=1.0, seed=5, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(model="base", messages=CAT, max_tokens=6, temperature=1.0, seed=5 + i)
             for i in range(3)]
    assert [c.message.content for c in many.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in many.choices}) > 1, "three draws alike: the seeds did not reach the rows"
    assert many.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert many.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counted once
    greedy = client.chat.completions.create(model="colors", messages=CAT, max_tokens=6, temperature=0, n=2)
    assert [c.message.content for c in greedy.choices] == ["red", "red"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="colors", messages=CAT, n=9)
    assert err.value.body["param"] == "n"


def test_a_stream_with_include_usage_ends_with_the_usage_and_streams_every_choice(live, client):
    whole = client.chat.completions.create(model="sizes", messages=[{"role": "user", "content": "Size of dog?"}],
                                           max_tokens=8, temperature=0, n=2)
    chunks = list(client.chat.completions.create(model="sizes", messages=[{"role": "user", "content": "Size of dog?"}],
                                                 max_tokens=8, temperature=0, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices[0].index == i) for i in (0, 1)]
    assert [t.strip() for t in texts] == [c.message.content for c in whole.choices] == ["big", "big"]
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert finishes == ["stop", "stop"]


def schema_valid(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == set(SCHEMA["required"]), value
    for key, rule in SCHEMA["properties"].items():
        assert value[key] in rule["enum"] if "enum" in rule else isinstance(value[key], bool), value
    return value


def test_json_schema_output_parses_and_validates_while_free_rows_in_the_batch_answer_as_alone(live, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA, "strict": True}}
    free = {animal: direct(live.service, "colors", f"Color of {animal}?") for animal in ANIMAL_COLORS}
    answers: dict = {}

    def ask(key, **kwargs):
        answers[key] = client.chat.completions.create(model="colors", max_tokens=48, temperature=0, **kwargs)

    threads = [threading.Thread(target=ask, args=(("json", i),),
                                kwargs={"messages": CAT, "response_format": fmt}) for i in range(2)]
    threads += [threading.Thread(target=ask, args=(animal,),
                                 kwargs={"messages": [{"role": "user", "content": f"Color of {animal}?"}]})
                for animal in ANIMAL_COLORS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {a: answers[a].choices[0].message.content for a in ANIMAL_COLORS} == free == ANIMAL_COLORS
    for i in range(2):
        choice = answers[("json", i)].choices[0]
        assert choice.finish_reason == "stop", choice
        schema_valid(choice.message.content)
    parsed = client.chat.completions.create(model="base", messages=CAT, max_tokens=48, temperature=0.8, seed=3,
                                            response_format=fmt).choices[0].message.content
    schema_valid(parsed)  # sampled, from the base, still valid


def test_json_object_mode_gives_a_json_object_or_a_prefix_of_one(live, client):
    reply = client.chat.completions.create(model="sizes", messages=CAT, max_tokens=64, temperature=0,
                                           response_format={"type": "json_object"}).choices[0]
    text = reply.message.content
    assert text.startswith("{")
    if reply.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # the budget ran out inside it: what there is cannot be anything but the start of an object
        with pytest.raises(json.JSONDecodeError) as err:
            json.loads(text)
        assert err.value.pos == len(text), text


def test_a_schema_that_cannot_be_compiled_is_a_400_naming_it(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="colors", messages=CAT, response_format=fmt)
    assert err.value.body["param"] == "response_format.json_schema.schema"


def test_raw_completions_continue_the_prompt_as_it_is(live, client):
    template = live.service.base.tokenizer.apply_chat_template(CAT, tokenize=False, add_generation_prompt=True)
    whole = client.completions.create(model="colors", prompt=template, max_tokens=8, temperature=0, logprobs=2)
    direct_text = live.service.engine.generate([ChatRequest("colors", (), SamplingParams(max_new_tokens=8),
                                                            prompt=template)])[0].text
    assert whole.choices[0].text == direct_text == "red" and whole.object == "text_completion"
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens).strip() == "red" and lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)
    streamed = client.completions.create(model="colors", prompt=template, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed).strip() == "red"
    two = client.completions.create(model="colors", prompt=[template, "Once upon"], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == "red"
    assert client.completions.create(model="colors", prompt=template, max_tokens=16).usage.prompt_tokens == \
        len(live.service.base.tokenizer(template)["input_ids"])


def test_unknown_fields_are_ignored_and_max_completion_tokens_caps_the_reply(live, client):
    reply = client.chat.completions.create(model="colors", messages=CAT, temperature=0, max_completion_tokens=1,
                                           user="someone", metadata={"k": "v"}, extra_body={"no_such_field": [1, 2]})
    assert reply.usage.completion_tokens == 1 and reply.choices[0].finish_reason == "length"
    response = httpx.post(f"{live.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "colors", "messages": CAT, "tools": [{"type": "function"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"


def test_stop_and_seed_reach_the_engine(live, client):
    stopped = client.chat.completions.create(model="colors", messages=CAT, temperature=0, max_tokens=8, stop=["e"])
    assert stopped.choices[0].message.content == "r"
    twice = [client.chat.completions.create(model="colors", messages=CAT, temperature=1.0, max_tokens=8, seed=11)
             .choices[0].message.content for _ in range(2)]
    assert twice[0] == twice[1] == direct(live.service, "colors", "Color of cat?", temperature=1.0, seed=11)


def test_streamed_logprobs_are_the_unstreamed_ones_chunk_by_chunk(client):
    whole = client.chat.completions.create(model="colors", messages=CAT, max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=2).choices[0].logprobs.content
    chunks = client.chat.completions.create(model="colors", messages=CAT, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True)
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in whole] and len(whole) == 3
    complete = client.completions.create  # the legacy form, with its text offsets carried across chunks
    raw = [c.choices[0].logprobs for c in complete(model="colors", prompt="Color of cat", max_tokens=6, temperature=0,
                                                   logprobs=1, stream=True) if c.choices[0].logprobs]
    alone = complete(model="colors", prompt="Color of cat", max_tokens=6, temperature=0, logprobs=1).choices[0].logprobs
    assert [t for lp in raw for t in lp.tokens] == alone.tokens
    assert [o for lp in raw for o in lp.text_offset] == alone.text_offset
