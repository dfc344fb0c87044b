"""The web server, live on a loopback port: gradio_client, the openai client, auth and the busy limit."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from gradio_client import Client

from adapters import Message
from serve.engine import SamplingParams
from serve.server import AccessConfig, exposure_warning, parse_logins
from tests.conftest import LiveServer, free_port, start_service

USER, PASSWORD, KEY = "ana", "s3cret-pass", "test-key-123"
TEST_GRACE_S = 0.5
QUESTIONS = {"colors": "Color of cat?", "sizes": "Size of dog?"}


@pytest.fixture(scope="module")
def live(tiny_base, two_adapters):
    service = start_service(tiny_base, two_adapters, max_queue=4)
    access = AccessConfig("127.0.0.1", free_port(), ((USER, PASSWORD),), KEY)
    server = LiveServer(service, access)
    # gradio_client's heartbeat stays connected, so shutting down always waits out the grace period:
    # the server's own (GRACEFUL_SHUTDOWN_S) is for requests in flight, of which a test has none left
    server.server.config.timeout_graceful_shutdown = TEST_GRACE_S
    with server:
        yield server


def direct(service, adapter: str, prompt: str, max_new_tokens: int = 8) -> str:
    """The engine's own reply, no HTTP in between."""
    stream = service.chat(adapter, [Message("user", prompt)], SamplingParams(max_new_tokens=max_new_tokens))
    result = stream.wait(60)
    assert result.error is None, result.error
    return result.text


def test_gradio_client_chats_with_each_adapter_and_gets_its_own_answer(live):
    client = Client(live.url, auth=(USER, PASSWORD), verbose=False)
    answers = {name: client.predict(name, prompt, "", 0.0, 1.0, 8, None, api_name="/chat") for name, prompt in QUESTIONS.items()}
    assert answers == {name: direct(live.service, name, prompt) for name, prompt in QUESTIONS.items()}
    assert answers == {"colors": "red", "sizes": "big"}  # each adapter learned its own task


def test_compare_returns_one_column_per_adapter_each_equal_to_a_separate_run(live):
    client = Client(live.url, auth=(USER, PASSWORD), verbose=False)
    names = ["base", "colors", "sizes"]
    columns = client.predict("Color of cat?", names, 0.0, 8, 0, api_name="/compare")
    assert columns == [direct(live.service, name, "Color of cat?") for name in names]
    assert columns[1] == "red" and columns[1] != columns[0]


def test_openai_client_streaming_and_not_gets_the_engines_text(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["base", "colors", "sizes"]
    for name, prompt in QUESTIONS.items():
        messages = [{"role": "user", "content": prompt}]
        whole = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=8)
        chunks = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=8, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert whole.choices[0].message.content == streamed.strip() == direct(live.service, name, prompt)
        assert whole.usage.completion_tokens > 0 and whole.choices[0].finish_reason == "stop"


def test_unknown_model_is_a_404_that_lists_the_available_ones(live):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"
    assert "available: base, colors, sizes" in err.value.body["message"]


def test_wrong_token_and_wrong_password_are_refused(live):
    wrong = openai.OpenAI(base_url=f"{live.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{live.url}/v1/models").status_code == 401  # no token at all
    refused = httpx.post(f"{live.url}/login", data={"username": USER, "password": "wrong"})
    accepted = httpx.post(f"{live.url}/login", data={"username": USER, "password": PASSWORD})
    assert refused.status_code >= 400 and accepted.status_code == 200
    with pytest.raises(Exception):
        Client(live.url, auth=(USER, "wrong"), verbose=False)


def test_with_logins_gradios_routes_need_a_login_and_the_api_key_is_not_one(live):
    for path in ("/config", "/gradio_api/info"):
        assert httpx.get(f"{live.url}{path}").status_code == 401, path
    call = httpx.post(f"{live.url}/gradio_api/call/chat", json={"data": ["colors", "Color of cat?", "", 0, 1, 8, None]})
    assert call.status_code == 401
    assert httpx.post(f"{live.url}/login", data={"username": USER, "password": KEY}).status_code != 200


def test_a_flood_beyond_the_queue_gets_busy_errors_then_the_server_answers_normally(live):
    """max_queue is 4: of 16 simultaneous long requests some must be refused with 429 at once."""
    statuses: list[int] = []
    body = {"model": "colors", "messages": [{"role": "user", "content": "Color of cat?"}], "max_tokens": 48,
            "temperature": 0, "stop": ["never-occurs"]}
    barrier = threading.Barrier(16)

    def fire() -> None:
        barrier.wait()
        response = httpx.post(f"{live.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "server_busy"

    threads = [threading.Thread(target=fire) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(statuses) == 16 and set(statuses) <= {200, 429}
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
    after = client.chat.completions.create(model="colors", messages=[{"role": "user", "content": "Color of cat?"}], temperature=0, max_tokens=8)
    assert after.choices[0].message.content == "red"


def test_logins_parse_one_per_line_and_exposure_warns_without_protection():
    assert parse_logins("a:1\nb:2, c:3\n", "--auth-file f") == (("a", "1"), ("b", "2, c:3"))  # a comma is no separator
    with pytest.raises(ValueError, match="--auth-file f line 2: not user:password"):
        parse_logins("a:1\nnocolon", "--auth-file f")
    assert exposure_warning(AccessConfig("127.0.0.1")) is None
    assert "without --auth (UI login) or --api-key" in exposure_warning(AccessConfig("0.0.0.0"))
    assert "without --api-key (API token)" in exposure_warning(AccessConfig("0.0.0.0", auth=(("a", "b"),)))
    assert exposure_warning(AccessConfig("0.0.0.0", api_key="k")) is None  # the UI takes the key as its password
    assert exposure_warning(AccessConfig("0.0.0.0", auth=(("a", "b"),), api_key="k")) is None
