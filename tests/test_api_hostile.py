"""A live server against careless and hostile clients and operators.

Every bad request gets OpenAI's error shape with the right status and the field it names; a
body too large is refused without being read; a client that leaves frees its place in the
queue; logins hold (the UI takes the API key when there are no logins, a comma stays inside its
password) and guessing is throttled; an operator's typo stops `python -m serve web` with one
line before the base loads, and SIGTERM stops it within seconds. After all of it, a normal
request through the official openai client still gets the adapter's answer.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from gradio_client import Client

from serve.__main__ import main
from serve.api import ApiLimits
from serve.server import GRACEFUL_SHUTDOWN_S, AccessConfig, AccessSettings, access_from
from tests.conftest import LiveServer, free_port, start_service, wait_until

# A live server per module, its graceful shutdowns and throttling windows: the full suite's tier.
pytestmark = pytest.mark.slow

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ApiLimits()
GOOD = {"model": "colors", "messages": [{"role": "user", "content": "Color of cat?"}], "temperature": 0, "max_tokens": 8}
LONG = {"model": "base", "messages": [{"role": "user", "content": "Echo: the big dog"}], "temperature": 0, "max_tokens": 200}
REPO = Path(__file__).resolve().parents[1]


def live(service, access: AccessConfig) -> LiveServer:
    server = LiveServer(service, access)
    # as serve.server.run does: a connection left open (gradio_client's heartbeat) must not hold up the teardown
    server.server.config.timeout_graceful_shutdown = GRACEFUL_SHUTDOWN_S
    return server


@pytest.fixture(scope="module")
def hostile(tiny_base, two_adapters):
    """An API key and no UI logins (so the UI takes the key), and room for two requests at once."""
    service = start_service(tiny_base, two_adapters, max_queue=2)
    with live(service, AccessConfig("127.0.0.1", free_port(), (), KEY)) as server:
        yield server


def completions(server) -> str:
    return f"{server.url}/v1/chat/completions"


def post_raw(server, content: bytes | str, headers: dict | None = None) -> httpx.Response:
    headers = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(completions(server), content=content, headers=headers, timeout=30)


def error_of(response: httpx.Response, status: int) -> dict:
    """The OpenAI-shaped error of a response that must have `status`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def body_text(extra: str = "", messages: str = '{"role": "user", "content": "hi"}') -> str:
    """A request body spelled out, for what json.dumps cannot write (NaN literals, lone surrogates)."""
    return '{"model": "colors", "messages": [%s]%s}' % (messages, extra)


def with_fields(**fields) -> str:
    return json.dumps({**GOOD, **fields})


BAD_BODIES = {  # case: (body, the field the error names (None: the body as a whole), words its message holds)
    "not UTF-8": ('{"model": "colors", "messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1"), None, "not UTF-8"),
    "not JSON": (b'{"model": ', None, "not JSON"),
    "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
    "not an object": (b"[]", None, "must be a JSON object, not list"),
    "an integer of 5000 digits": (body_text(', "max_tokens": ' + "9" * 5000), None, "not JSON"),
    "NaN temperature": (body_text(', "temperature": NaN'), "temperature", "finite number"),
    "infinite top_p": (body_text(', "top_p": Infinity'), "top_p", "finite number"),
    "overflowing temperature": (body_text(', "temperature": 1e999'), "temperature", "finite number"),
    "stream as a string": (body_text(', "stream": "yes"'), "stream", "valid boolean"),
    "max_tokens as a string": (body_text(', "max_tokens": "8"'), "max_tokens", "valid integer"),
    "lone surrogate in content": (body_text(messages='{"role": "user", "content": "hello \\ud83d"}'),
                                  "messages[0].content", "lone UTF-16 surrogate at character 6"),
    "lone surrogate in a stop string": (body_text(', "stop": ["ok", "\\udc00"]'), "stop[1]", "lone UTF-16 surrogate"),
    "lone surrogate in the model": ('{"model": "\\ud800", "messages": []}', "model", "lone UTF-16 surrogate"),
    "seed of 2**64": (body_text(', "seed": 18446744073709551616'), "seed", "less than 18446744073709551616"),
    "negative seed": (body_text(', "seed": -1'), "seed", "greater than or equal to 0"),
    "unknown role": (body_text(messages='{"role": "tool", "content": "hi"}'), "messages[0].role", "'system', 'developer', 'user' or 'assistant'"),
    "no messages": (body_text(messages=""), "messages", "at least 1 item"),
    "too many messages": (with_fields(messages=[{"role": "user", "content": "hi"}] * (LIMITS.max_messages + 1)),
                          "messages", f"{LIMITS.max_messages + 1} messages, more than the server's limit of {LIMITS.max_messages}"),
    "too many stop strings": (with_fields(stop=[f"s{i}" for i in range(LIMITS.max_stop + 1)]),
                              "stop", f"more than the server's limit of {LIMITS.max_stop}"),
    "a stop string too long": (with_fields(stop=["ok", "x" * (LIMITS.max_stop_chars + 1)]),
                               "stop[1]", f"more than the server's limit of {LIMITS.max_stop_chars}"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_a_bad_body_is_a_400_in_openais_shape_naming_its_field(hostile, case):
    body, param, words = BAD_BODIES[case]
    error = error_of(post_raw(hostile, body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]
    if param:
        assert error["message"].startswith(f"{param}: ")


def test_a_prompt_longer_than_the_context_is_a_400_context_length_exceeded(hostile):
    long_prompt = [{"role": "user", "content": "Color of cat? " * 200}]  # the tiny base's context is 256 tokens
    for stream in (False, True):  # refused before it runs: a plain error even when streaming was asked for
        error = error_of(post_raw(hostile, with_fields(messages=long_prompt, stream=stream)), 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert error["message"].startswith("messages: ") and "context" in error["message"]


def test_a_body_over_the_limit_is_a_413_and_one_at_the_limit_is_served(hostile):
    error = error_of(post_raw(hostile, b" " * (LIMITS.max_body_bytes + 1)), 413)
    assert error["code"] == "request_too_large" and str(LIMITS.max_body_bytes) in error["message"]
    padded = with_fields().encode()
    at_limit = padded + b" " * (LIMITS.max_body_bytes - len(padded))  # JSON allows trailing whitespace
    response = post_raw(hostile, at_limit)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "red"


def raw_exchange(server, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send a request head and part of a body, never its end; the server's status and JSON answer.
    A server that waited for the rest of the body would time out here."""
    with socket.create_connection(("127.0.0.1", server.access.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        received = b""
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < _length(received):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {received!r}"
            received += chunk
    status = int(received.split(b" ", 2)[1])
    return status, json.loads(received.partition(b"\r\n\r\n")[2][: _length(received)])


def _length(response: bytes) -> int:
    for line in response.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def _head(**headers: str) -> str:
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}",
             "Content-Type: application/json"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def test_a_declared_content_length_over_the_limit_is_refused_before_any_body_is_read(hostile):
    status, body = raw_exchange(hostile, _head(Content_Length=str(10 * LIMITS.max_body_bytes)))  # and no body at all
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_a_chunked_body_is_refused_once_it_passes_the_limit_without_waiting_for_its_end(hostile):
    piece = b"x" * 65536
    chunks = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * (LIMITS.max_body_bytes // len(piece) + 1)
    status, body = raw_exchange(hostile, _head(Transfer_Encoding="chunked"), chunks)  # no terminating 0-chunk
    assert status == 413 and body["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/v1/nope", 404, None),
    ("GET", "/v1", 404, None),
    ("POST", "/v1/models", 405, "GET"),
    ("GET", "/v1/chat/completions", 405, "POST"),
    ("DELETE", "/v1/chat/completions", 405, "POST"),
])
def test_unknown_paths_and_wrong_methods_under_v1_answer_in_openais_shape(hostile, method, path, status, allow):
    response = httpx.request(method, f"{hostile.url}{path}", headers=AUTH)
    error = error_of(response, status)
    assert path in error["message"] and error["type"] == "invalid_request_error"
    assert response.headers.get("allow") == allow


def test_gradios_own_routes_keep_gradios_answers(hostile):
    response = httpx.get(f"{hostile.url}/no-such-page")
    assert response.status_code == 404 and "error" not in response.json()


def test_an_unexpected_exception_is_an_openai_shaped_500_logged_with_its_traceback(hostile, monkeypatch, caplog):
    def broken() -> list:
        raise RuntimeError("registry on fire")

    monkeypatch.setattr(hostile.service.registry, "servable", broken)  # what /v1/models lists
    with caplog.at_level(logging.ERROR, logger="serve.api"):
        response = httpx.get(f"{hostile.url}/v1/models", headers=AUTH)
    error = error_of(response, 500)
    assert error["type"] == "server_error" and "on fire" not in error["message"]  # internals stay in the log
    logged = [r for r in caplog.records if r.name == "serve.api" and r.exc_info]
    assert logged and str(logged[0].exc_info[1]) == "registry on fire"


# -- clients that leave ----------------------------------------------------------------------

@pytest.fixture
def streams(hostile, monkeypatch) -> list:
    """Every stream the service hands out during the test, in order."""
    seen: list = []
    submit_all = hostile.service.submit_all

    def spy(*args, **kwargs):
        streams = submit_all(*args, **kwargs)
        seen.extend(streams)
        return streams

    monkeypatch.setattr(hostile.service, "submit_all", spy)
    return seen


@contextmanager
def frozen_decode_loop(service):
    """Hold the engine's lock, so the decode loop runs no step: no request can end by itself."""
    service.engine.lock.acquire()
    try:
        yield
    finally:
        service.engine.lock.release()


def test_non_streaming_clients_that_leave_cancel_their_requests_and_free_their_places(hostile, streams):
    """max_queue is 2: two abandoned requests hold both places until their cancels take effect."""
    with frozen_decode_loop(hostile.service):
        for _ in range(2):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(completions(hostile), json=LONG, headers=AUTH, timeout=httpx.Timeout(10, read=0.5))
        assert error_of(httpx.post(completions(hostile), json=GOOD, headers=AUTH, timeout=10), 429)["code"] == "server_busy"
        assert wait_until(lambda: all(s.cancelled.is_set() for s in streams[:2]), 3), "a departed client's request was not cancelled"
        assert [s.result for s in streams] == [None, None]  # frozen: only the disconnect can have cancelled them
    assert all(s.wait(10).new_tokens < 5 for s in streams)  # ended at their next step, not after 200 tokens
    after = httpx.post(completions(hostile), json=GOOD, headers=AUTH, timeout=30)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "red"


def test_a_streaming_client_that_hangs_up_cancels_its_generation(hostile, streams):
    with frozen_decode_loop(hostile.service):
        with httpx.stream("POST", completions(hostile), json={**LONG, "stream": True}, headers=AUTH, timeout=10) as response:
            assert response.status_code == 200
            assert '"role": "assistant"' in next(response.iter_lines())  # the first event comes before any token
        assert wait_until(lambda: streams and streams[0].cancelled.is_set(), 3), "a hung-up stream was not cancelled"
        assert streams[0].result is None
    assert streams[0].wait(10).new_tokens < 5


# -- logins ----------------------------------------------------------------------------------

def client_from(address: str) -> httpx.Client:
    """A client connecting from another loopback address: the throttle counts by address."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


def test_with_an_api_key_and_no_logins_gradio_routes_need_the_key(hostile):
    for path in ("/config", "/gradio_api/info"):
        assert httpx.get(f"{hostile.url}{path}").status_code == 401, path
    call = httpx.post(f"{hostile.url}/gradio_api/call/chat", json={"data": ["colors", "Color of cat?", "", 0, 1, 8, None]})
    assert call.status_code == 401
    with httpx.Client(base_url=hostile.url) as browser:
        assert browser.post("/login", data={"username": "anyone", "password": KEY}).status_code == 200
        assert browser.get("/config").status_code == 200
    client = Client(hostile.url, auth=("anyone", KEY), verbose=False)
    try:
        assert client.predict("colors", "Color of cat?", "", 0.0, 1.0, 8, None, api_name="/chat") == "red"
    finally:
        client.close()


def test_failed_logins_from_one_address_are_throttled_and_others_are_not(hostile):
    with client_from("127.0.0.2") as guesser:
        for _ in range(5):
            assert guesser.post(f"{hostile.url}/login", data={"username": "x", "password": "guess"}).status_code in (400, 401)
        locked = guesser.post(f"{hostile.url}/login", data={"username": "x", "password": KEY})
        assert error_of(locked, 429)["code"] == "rate_limit_exceeded" and int(locked.headers["Retry-After"]) > 0
    assert httpx.post(f"{hostile.url}/login", data={"username": "x", "password": KEY}).status_code == 200


def test_wrong_api_keys_are_throttled_and_requests_without_a_key_are_not_counted(hostile):
    models = f"{hostile.url}/v1/models"
    with client_from("127.0.0.3") as guesser:
        for _ in range(5):
            assert error_of(guesser.get(models, headers={"Authorization": "Bearer guess"}), 401)["code"] == "invalid_api_key"
        assert error_of(guesser.get(models, headers=AUTH), 429)["code"] == "rate_limit_exceeded"
    with client_from("127.0.0.4") as forgetful:
        for _ in range(8):
            assert forgetful.get(models).status_code == 401
        assert forgetful.get(models, headers=AUTH).status_code == 200


def access_args(**given) -> AccessSettings:
    return AccessSettings(**given)


PASSWORD = "pa,ss:w0rd, x "


@pytest.fixture
def no_env_logins(monkeypatch):
    monkeypatch.delenv("LORASWAP_AUTH", raising=False)
    monkeypatch.delenv("LORASWAP_API_KEY", raising=False)


def test_an_auth_file_line_is_one_login_split_at_its_first_colon(tmp_path, no_env_logins):
    logins = tmp_path / "logins"
    logins.write_text(f"# the team\n\nana:{PASSWORD}\r\nbob:b\n", encoding="utf-8")
    assert access_from(access_args(auth_file=str(logins))).auth == (("ana", PASSWORD), ("bob", "b"))
    assert access_from(access_args(auth=["ana:a,bob:b", "cy:c"])).auth == (("ana", "a,bob:b"), ("cy", "c"))


@pytest.mark.parametrize("given, names", [
    ({"auth": [" , "]}, "--auth: not user:password (no colon)"),
    ({"auth": [":secret"]}, "--auth: not user:password (empty user name)"),
    ({"auth": ["ana:"]}, "--auth: not user:password (empty password)"),
    ({"auth": ["ana:a", "ana:b"]}, "--auth: user 'ana' has more than one login"),
    ({"api_key": " "}, "--api-key: empty"),
])
def test_auth_values_that_yield_no_single_login_are_refused_naming_their_flag(given, names, no_env_logins):
    with pytest.raises(ValueError) as err:
        access_from(access_args(**given))
    assert str(err.value).startswith(names)
    assert "secret" not in str(err.value)  # the error never shows a password


def test_an_auth_file_without_logins_is_refused_naming_the_file(tmp_path, no_env_logins):
    empty = tmp_path / "logins"
    empty.write_text("# nobody yet\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"--auth-file {empty}: no user:password line"):
        access_from(access_args(auth_file=str(empty)))


@pytest.fixture(scope="module")
def with_logins(tiny_base, two_adapters, tmp_path_factory):
    """UI logins from a file (one password holds commas and colons) and an API key."""
    file = tmp_path_factory.mktemp("logins") / "logins"
    file.write_text(f"ana:{PASSWORD}\n", encoding="utf-8")
    access = access_from(access_args(port=free_port(), auth_file=str(file), api_key=KEY))
    with live(start_service(tiny_base, two_adapters), access) as server:
        yield server


def test_a_comma_password_from_an_auth_file_logs_in_one_user_and_the_key_is_no_ui_password(with_logins):
    assert with_logins.access.auth == (("ana", PASSWORD),)

    def login(user: str, password: str) -> int:
        return httpx.post(f"{with_logins.url}/login", data={"username": user, "password": password}).status_code

    assert login("ana", PASSWORD) == 200
    assert login("ana", "pa") != 200 and login("ss", "w0rd, x ") != 200  # no second login from the comma
    assert login("anyone", KEY) != 200  # with logins, the key opens the API only
    client = Client(with_logins.url, auth=("ana", PASSWORD), verbose=False)
    try:
        assert client.predict("sizes", "Size of dog?", "", 0.0, 1.0, 8, None, api_name="/chat") == "big"
    finally:
        client.close()


# -- operators -------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--max-queue", "-1"], "--max-queue must be at least 1, got -1"),
    (["--max-loaded", "0"], "--max-loaded must be at least 1, got 0"),
    (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1, got 0"),
    (["--max-stop", "0"], "--max-stop must be at least 1, got 0"),
    (["--auth", " , "], "--auth: not user:password (no colon)"),
])
def test_an_operator_typo_is_one_line_and_status_2_before_the_base_loads(flags, says, tmp_path, capsys, no_env_logins):
    code = main(["--base", str(tmp_path / "no-such-base"), "web", *flags])  # loading it would fail otherwise
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [f"error: {says}"]


def test_a_port_in_use_is_one_line_and_status_2_before_the_base_loads(tmp_path, capsys, no_env_logins):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--base", str(tmp_path / "no-such-base"), "web", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [f"error: cannot serve on 127.0.0.1:{port}: Address already in use"]


@pytest.mark.slow
def test_sigterm_stops_the_server_within_seconds_with_requests_in_flight(tiny_base, two_adapters, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "serve", "--base", str(tiny_base), "--adapters", str(two_adapters.root),
               "web", "--port", str(port)]
    env = {**os.environ, "LORASWAP_API_KEY": KEY}  # the secret as the README shows it, out of `ps`
    with log.open("w") as out:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _answers(f"{url}/v1/models"), 120), log.read_text()
        with socket.create_connection(("127.0.0.1", port)) as stalled:  # a body that never finishes arriving
            stalled.sendall(_head(Content_Length="1000").encode() + b'{"model": ')
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True}, headers=AUTH) as streaming:
                next(streaming.iter_lines())
                started = time.monotonic()
                server.send_signal(signal.SIGTERM)
                code = server.wait(timeout=30)
        # uvicorn re-raises the signal once it has shut down, into serve.server's handler: a clean exit
        assert code == 0 and time.monotonic() - started < 3 * GRACEFUL_SHUTDOWN_S, log.read_text()
        assert log.read_text().count("serving on") == 1
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, headers=AUTH, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# -- after all of it -------------------------------------------------------------------------

def test_after_all_of_that_a_normal_request_gets_the_adapters_answer(hostile):
    client = openai.OpenAI(base_url=f"{hostile.url}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="colors", messages=[{"role": "user", "content": "Color of cat?"}],
                                           temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == "red"
