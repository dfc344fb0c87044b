"""`make check-invariance`: does every request get the answer it gets alone, under load?

Against a running server (`--url`), or one it starts itself (`--serve default|deterministic`,
on a free loopback port), through the OpenAI API:

1. every model the server lists (each adapter and the base) answers every prompt alone, one
   request at a time: greedy, and sampled with a seed;
2. the same requests, repeated to `--requests` in shuffled order, from `--threads` threads at
   once; each answer is compared with the one it got alone;
3. through Gradio's compare endpoint (gradio_client): each column equals that adapter alone.

It prints the mismatch counts as JSON. With `--expect-exact` (the deterministic mode's promise)
it exits 1 on any mismatch. The load is bounded: `--requests` requests, each at most
`--max-tokens` tokens, and every call has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from adapters.base import DEFAULT_BASE

PROMPTS = (
    "Is this positive or negative? the kind farmer sings",
    "How many words? red cat sits near the river",
    "Which word comes last? moon ship lamp king",
    "Extract name, age and city as JSON: Ana is 34 and lives in Lima.",
    "the quick brown fox jumps",
)


@dataclass(frozen=True)
class Ask:
    """One distinct request of the load."""

    model: str
    prompt: str
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class Report:
    distinct: int
    requests: int
    mismatches: int
    errors: int
    seconds: float
    tokens: int
    compare_columns: int = 0
    compare_mismatches: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


Answer = Callable[[Ask], tuple[str, int]]
"""Sends one request; returns its text and completion tokens."""


def distinct_asks(models: list[str], prompts=PROMPTS) -> list[Ask]:
    greedy = [Ask(m, p) for m in models for p in prompts]
    sampled = [Ask(m, p, temperature=1.0, seed=11 + i) for m in models for i, p in enumerate(prompts[:2])]
    return greedy + sampled


def load_test(answer: Answer, asks: list[Ask], requests: int, threads: int, seed: int = 0) -> Report:
    """Each ask alone, then `requests` of them shuffled over `threads` threads; count the answers
    that differ from the ask's own."""
    alone = {ask: answer(ask)[0] for ask in asks}
    load = [asks[i % len(asks)] for i in range(requests)]
    random.Random(seed).shuffle(load)

    def one(ask: Ask) -> tuple[Ask, str | None, int]:
        try:
            text, tokens = answer(ask)
            return ask, text, tokens
        except Exception as err:  # counted and shown: the load goes on
            print(f"error: {ask}: {type(err).__name__}: {err}", file=sys.stderr)
            return ask, None, 0

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, load))
    seconds = time.perf_counter() - start
    errors = sum(text is None for _, text, _ in results)
    mismatches = sum(text is not None and text != alone[ask] for ask, text, _ in results)
    return Report(len(asks), requests, mismatches, errors, round(seconds, 2), sum(t for *_, t in results))


def openai_answer(url: str, api_key: str | None, max_tokens: int) -> Answer:
    """Answers through the official openai client, retrying a 429 (the server's queue is bounded)."""
    from openai import OpenAI, RateLimitError

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", timeout=120, max_retries=0)

    def answer(ask: Ask) -> tuple[str, int]:
        for attempt in range(50):
            try:
                reply = client.chat.completions.create(
                    model=ask.model, messages=[{"role": "user", "content": ask.prompt}], temperature=ask.temperature,
                    seed=ask.seed, max_tokens=max_tokens)
                return reply.choices[0].message.content, reply.usage.completion_tokens
            except RateLimitError:
                time.sleep(0.05 * (attempt + 1))
        raise RuntimeError("still busy after 50 tries")

    return answer


def compare_check(url: str, answer: Answer, models: list[str], max_tokens: int, auth: tuple[str, str] | None = None) -> tuple[int, int]:
    """Gradio's /compare for every prompt over the models (six at most at once): (columns, mismatches)."""
    from gradio_client import Client

    client = Client(url, auth=auth, verbose=False)
    columns = mismatches = 0
    for prompt in PROMPTS:
        for start in range(0, len(models), 6):
            group = models[start : start + 6]
            answers = client.predict(prompt, group, 0.0, max_tokens, None, api_name="/compare")
            for model, got in zip(group, answers):
                columns += 1
                mismatches += got != answer(Ask(model, prompt))[0]
    return columns, mismatches


def listed_models(url: str, api_key: str | None) -> list[str]:
    from openai import OpenAI

    return [m.id for m in OpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", timeout=30).models.list()]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started_server(base: str, adapters: str | None, mode: str, timeout_s: float = 300) -> Iterator[str]:
    """`python -m serve web` in a subprocess on a free loopback port, in the given mode; its URL."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "serve", "--base", base, *(["--adapters", adapters] if adapters else []),
               "web", "--host", "127.0.0.1", "--port", str(port), *(["--deterministic"] if mode == "deterministic" else [])]
    process = subprocess.Popen(command, env={**os.environ, "LORASWAP_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer in {timeout_s} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def check(url: str, args) -> Report:
    models = listed_models(url, args.api_key)
    answer = openai_answer(url, args.api_key, args.max_tokens)
    report = load_test(answer, distinct_asks(models), args.requests, args.threads)
    if not args.no_compare:
        report.compare_columns, report.compare_mismatches = compare_check(url, answer, models, args.max_tokens)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="A running server, e.g. http://127.0.0.1:7860.")
    where.add_argument("--serve", choices=("default", "deterministic"), nargs="+",
                       help="Start a server in each of these modes in turn and check it.")
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--adapters", default=None)
    parser.add_argument("--api-key", default=os.environ.get("LORASWAP_API_KEY") or None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--no-compare", action="store_true", help="Skip the Gradio compare check.")
    parser.add_argument("--expect-exact", action="store_true", help="Exit 1 on any mismatch (the deterministic promise).")
    args = parser.parse_args(argv)
    reports: dict[str, Report] = {}
    if args.url:
        reports["server"] = check(args.url, args)
    else:
        for mode in args.serve:
            with started_server(args.base, args.adapters, mode) as url:
                reports[mode] = check(url, args)
    print(json.dumps({k: {**asdict(r), "tokens_per_s": round(r.tokens_per_s, 1)} for k, r in reports.items()}, indent=2))
    exact = [r for k, r in reports.items() if k == "deterministic" or args.expect_exact]
    failed = any(r.mismatches or r.compare_mismatches or r.errors for r in exact)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
