"""Hostile requests while other clients are served: the neighbours get every answer, complete and
unchanged; every permit comes back; the adapter store is byte for byte what it was."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from adapters import AdapterStore
from serve.server import AccessConfig
from tests.conftest import ANIMAL_COLORS, ANIMAL_SIZES, LiveServer, free_port, start_service
from tests.test_api_hostile import BAD_BODIES, LONG

NEIGHBOURS, ROUNDS = 4, 8
"""Bounded: 4 client threads of 8 requests each, beside the hostile ones."""


def store_digest(root: Path) -> dict[str, str]:
    """Every file, link and folder under the store, with its bytes' or its target's digest."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "link:" + str(path.readlink())
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "dir"
    return found


def neighbour(url: str, k: int, answers: list, errors: list) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
    tasks = [("colors", "Color of {}?", ANIMAL_COLORS), ("sizes", "Size of {}?", ANIMAL_SIZES)]
    for i in range(ROUNDS):
        model, question, table = tasks[(k + i) % 2]
        animal = list(table)[(k + i) % len(table)]
        for attempt in range(100):
            try:
                reply = client.chat.completions.create(model=model, temperature=0, max_tokens=8,
                                                       messages=[{"role": "user", "content": question.format(animal)}])
                answers.append((reply.choices[0].message.content, table[animal], reply.choices[0].finish_reason))
                break
            except openai.RateLimitError:  # the queue is bounded: a busy answer is retried, not counted
                time.sleep(0.05)
            except Exception as err:
                errors.append(repr(err))
                break


def hostile_requests(url: str) -> list[int]:
    """Every bad body of tests/test_api_hostile.py twice, unknown models, prompts past the
    context, and clients that hang up mid-request: their statuses."""
    statuses = []
    headers = {"Content-Type": "application/json"}
    for _ in range(2):
        for body, *_ in BAD_BODIES.values():
            statuses.append(httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers, timeout=30).status_code)
    for body in ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
                 {"model": "colors", "messages": [{"role": "user", "content": "word " * 2000}]}):
        statuses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code)
    for stream in (False, True):
        try:
            httpx.post(f"{url}/v1/chat/completions", json={**LONG, "stream": stream}, timeout=0.3)
        except httpx.TimeoutException:
            statuses.append(499)  # the client left
    return statuses


@pytest.mark.slow
def test_neighbours_are_unharmed_by_hostile_requests(tiny_base, two_adapters, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(two_adapters.root, root, symlinks=True)
    before = store_digest(root)
    service = start_service(tiny_base, AdapterStore(root), max_queue=8)
    answers, errors = [], []
    with LiveServer(service, AccessConfig(port=free_port())) as server:
        clients = [threading.Thread(target=neighbour, args=(server.url, k, answers, errors)) for k in range(NEIGHBOURS)]
        for client in clients:
            client.start()
        statuses = hostile_requests(server.url)
        for client in clients:
            client.join(120)
        deadline = time.monotonic() + 15
        while service.requests_held() and time.monotonic() < deadline:
            time.sleep(0.05)
        held = service.requests_held()
        after_all = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
            "model": "colors", "temperature": 0, "messages": [{"role": "user", "content": "Color of dog?"}]})
    assert len(statuses) >= 32 and all(400 <= s < 500 for s in statuses), statuses
    assert errors == []
    assert len(answers) == NEIGHBOURS * ROUNDS
    assert [(got, reason) for got, _, reason in answers] == [(want, "stop") for _, want, _ in answers]
    assert held == 0
    assert after_all.status_code == 200 and after_all.json()["choices"][0]["message"]["content"] == "blue"
    assert store_digest(root) == before
