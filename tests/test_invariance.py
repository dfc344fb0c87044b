"""The load test of bench/invariance.py against a live deterministic server: every answer under
concurrent, shuffled load is the one it gets alone, through the API and Gradio's compare."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.invariance import Ask, check, load_test
from serve.server import AccessConfig
from serve.slots import DecodeSettings
from tests.conftest import LiveServer, free_port, start_service


@pytest.mark.slow
def test_a_deterministic_server_gives_every_request_its_own_answer_under_load(two_adapters, tiny_base):
    service = start_service(tiny_base, two_adapters, decode=DecodeSettings(deterministic=True, context=64))
    with LiveServer(service, AccessConfig(port=free_port())) as server:
        args = SimpleNamespace(api_key=None, max_tokens=8, requests=120, threads=16, no_compare=False)
        report = check(server.url, args)
        assert service.requests_held() == 0
    assert report.requests == 120 and report.distinct == 3 * 7  # base, colors, sizes x (5 greedy + 2 seeded)
    assert (report.errors, report.mismatches) == (0, 0)
    assert report.compare_columns == 3 * 5 and report.compare_mismatches == 0


def test_the_load_test_counts_what_differs():
    """A fake server whose answers drift after their first: the load test must see it."""
    seen: dict[Ask, int] = {}

    def answer(ask: Ask) -> tuple[str, int]:
        seen[ask] = seen.get(ask, 0) + 1
        return ("same" if seen[ask] == 1 or ask.model == "steady" else f"drift {seen[ask]}"), 1

    asks = [Ask("steady", "p"), Ask("drifting", "p")]
    report = load_test(answer, asks, requests=10, threads=2)
    assert (report.mismatches, report.errors, report.tokens) == (5, 0, 10)
