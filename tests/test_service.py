"""What the UI and API call, without either: compare, busy limits, the adapter table, unload."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from adapters import Message
from serve.engine import ChatRequest, SamplingParams
from serve.service import BusyError, divergence
from tests.conftest import ANIMAL_COLORS, start_service, wait_until


@pytest.fixture(scope="module")
def service(tiny_base, two_adapters):
    svc = start_service(tiny_base, two_adapters, max_queue=3)
    yield svc
    svc.close()


def test_divergence_is_the_first_differing_word():
    assert divergence("a b c", "a b c") is None
    assert divergence("a b c", "a x c") == 1
    assert divergence("a b", "a b c") == 2
    assert divergence("a b c", "") == 0


def test_compare_answers_equal_separate_runs_in_the_given_order(service):
    params = SamplingParams(max_new_tokens=6)
    prompt = [Message("user", "Color of dog?")]
    together = [s.wait(60).text for s in service.compare(["sizes", "base", "colors"], prompt, params)]
    alone = [service.chat(name, prompt, params).wait(60).text for name in ("sizes", "base", "colors")]
    assert together == alone and together[2] == "blue"


def test_more_requests_than_the_queue_holds_are_refused_and_the_slots_come_back(service):
    params = SamplingParams(max_new_tokens=40, stop=("never-occurs",))
    held = [service.chat("colors", [Message("user", "Color of cat?")], params) for _ in range(3)]
    with pytest.raises(BusyError, match="3 requests are already waiting or running"):
        service.chat("colors", [Message("user", "Color of cat?")], params)
    with pytest.raises(BusyError):  # compare takes a slot per adapter: none is left
        service.compare(["base", "colors"], [Message("user", "Color of cat?")], params)
    for stream in held:
        stream.cancel()
        stream.wait(60)
    assert service.chat("colors", [Message("user", "Color of cat?")], SamplingParams(max_new_tokens=4)).wait(60).text == "red"


def own_requests() -> list[ChatRequest]:
    """What the promotion gate would replay on 'colors': one request per animal it was trained on."""
    return [ChatRequest("colors", (Message("user", f"Color of {animal}?"),), SamplingParams(max_new_tokens=8))
            for animal in ANIMAL_COLORS]


def test_the_servers_own_requests_hold_one_place_of_three_and_answer_in_order(service):
    """max_queue 3: the gate's replays take a quarter of the places (at least one), never more."""
    params = SamplingParams(max_new_tokens=4)
    ask = [Message("user", "Color of cat?")]
    assert service.background_places() == 1
    with ThreadPoolExecutor(1) as pool:
        with service.engine.lock:  # the decode loop is frozen: what is queued stays queued
            running = pool.submit(service.generate_in_turn, own_requests(), 120)
            assert wait_until(lambda: service.requests_held() == 1, 10), "the server's own request holds no place"
            users = [service.chat("colors", ask, params) for _ in range(2)]
            with pytest.raises(BusyError):
                service.chat("colors", ask, params)
            assert service.requests_held() == 3
        results = running.result(timeout=120)
    assert [r.text for r in results] == list(ANIMAL_COLORS.values())
    assert [u.wait(60).text for u in users] == ["red", "red"]
    assert wait_until(lambda: service.requests_held() == 0, 10)


def test_with_no_place_free_the_servers_own_requests_wait_then_time_out_keeping_no_place(service):
    params = SamplingParams(max_new_tokens=4)
    with service.engine.lock:
        users = [service.chat("colors", [Message("user", "Color of cat?")], params) for _ in range(3)]
        with pytest.raises(TimeoutError, match="no free place in the queue for a request to 'colors'"):
            service.generate_in_turn(own_requests(), 0.3)
        assert service.requests_held() == 3
    assert [u.wait(60).text for u in users] == ["red"] * 3
    assert wait_until(lambda: service.requests_held() == 0, 10)
    with service.engine.lock:  # a place, but no reply in time: the request is cancelled and its place comes back
        with pytest.raises(TimeoutError):
            service.generate_in_turn(own_requests(), 0.3)
    assert wait_until(lambda: service.requests_held() == 0, 10)


def test_the_adapter_table_lists_the_base_every_adapter_and_unload_moves_one_off_the_device(service):
    service.chat("colors", [Message("user", "Color of cat?")], SamplingParams(max_new_tokens=2)).wait(60)
    rows = {r.name: r for r in service.adapter_rows()}
    assert list(rows) == ["base", "colors", "sizes"]
    assert rows["colors"].status == "servable, on device" and rows["colors"].rank == 8
    assert rows["colors"].metric.startswith("exact_match") and rows["colors"].loss_curve.is_file()
    assert service.unload("colors") is True and service.unload("colors") is False
    assert {r.name: r.status for r in service.adapter_rows()}["colors"] == "servable"
    # Unloaded is not gone: the next request brings it back from host memory.
    assert service.chat("colors", [Message("user", "Color of cat?")], SamplingParams(max_new_tokens=4)).wait(60).text == "red"


def test_a_new_adapter_appears_in_the_table_by_itself(service, tiny_base):
    import time

    from tests.conftest import save_random_adapter

    save_random_adapter(service.registry.store, "fresh", tiny_base, seed=5)
    try:
        deadline = time.monotonic() + 5
        while "fresh" not in [r.name for r in service.adapter_rows()]:
            assert time.monotonic() < deadline, "the watcher did not pick up the new adapter"
            time.sleep(0.05)
        assert "fresh" in service.model_names()
    finally:
        service.registry.store.delete("fresh")
        service.refresh()  # gone now, not at the watcher's next scan: the module's other tests list the store
