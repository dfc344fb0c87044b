"""/health and /metrics (serve/metrics.py), live on a loopback port: the Prometheus text parsed back,
read before and after requests, loads and evictions, and vLLM's `lora_requests_info` while requests
wait and run."""

from __future__ import annotations

import shutil
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters import Message
from serve.engine import SamplingParams
from serve.management import FleetSettings
from serve.server import AccessConfig
from serve.service import Service, ServiceConfig
from tests.conftest import LiveServer, free_port

KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = {"colors": "Color of cat?", "sizes": "Size of dog?"}


@pytest.fixture(scope="module")
def live(tiny_base, two_adapters, tmp_path_factory):
    """One adapter on the device at a time, so that every switch evicts the other."""
    extra = tmp_path_factory.mktemp("metrics-roots")
    shutil.copytree((two_adapters.root / "colors").resolve(), extra / "tint")
    config = ServiceConfig(base=str(tiny_base), adapters=str(two_adapters.root), max_loaded=1, watch_s=0.2,
                           reports=str(extra / "reports"))
    fleet = FleetSettings(allow_runtime_loading=True, adapter_roots=(str(extra),))
    with LiveServer(Service.start(config), AccessConfig("127.0.0.1", free_port(), (), KEY), fleet=fleet) as server:
        server.extra = extra
        yield server


@pytest.fixture
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)


def scrape(live) -> dict[str, list]:
    """Sample name -> [(labels, value)], from the text /metrics serves."""
    response = httpx.get(f"{live.url}/metrics", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict, name: str, default: float = 0.0, **labels) -> float:
    found = [v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else default


def ask(client: openai.OpenAI, model: str):
    messages = [{"role": "user", "content": QUESTIONS.get(model, QUESTIONS["colors"])}]
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)


def residency(samples: dict, adapter: str) -> str:
    (tier,) = [labels["tier"] for labels, v in samples["loraswap_adapter_residency"] if labels["adapter"] == adapter and v == 1]
    return tier


def test_health_is_open_and_metrics_need_the_key(live):
    health = httpx.get(f"{live.url}/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert httpx.get(f"{live.url}/metrics").status_code == 401
    wrong = httpx.get(f"{live.url}/metrics", headers={"Authorization": "Bearer nope"})
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (401, "invalid_api_key")


def test_requests_tokens_and_latencies_count_up_per_adapter(live, client):
    before = scrape(live)
    answers = [ask(client, "colors"), ask(client, "colors"), ask(client, "sizes")]
    after = scrape(live)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("loraswap_requests_total", adapter="colors", status="ok") == 2
    assert delta("loraswap_requests_total", adapter="sizes", status="ok") == 1
    colors = answers[:2]
    assert delta("loraswap_prompt_tokens_total", adapter="colors") == sum(a.usage.prompt_tokens for a in colors)
    assert delta("loraswap_generation_tokens_total", adapter="colors") == sum(a.usage.completion_tokens for a in colors)
    assert delta("loraswap_time_to_first_token_seconds_count", adapter="colors") == 2
    assert delta("loraswap_request_latency_seconds_count", adapter="colors") == 2
    # one gap per token after the first (the end-of-turn step among them)
    assert delta("loraswap_time_per_output_token_seconds_count", adapter="colors") == sum(a.usage.completion_tokens for a in colors)
    assert 0 < delta("loraswap_time_to_first_token_seconds_sum", adapter="colors") < delta(
        "loraswap_request_latency_seconds_sum", adapter="colors")


def test_loads_evictions_and_tiers_follow_the_adapters_through_device_host_and_disk(live, client):
    ask(client, "sizes")
    before = scrape(live)
    assert (residency(before, "sizes"), residency(before, "colors")) in {("device", "host"), ("device", "disk")}
    ask(client, "colors")  # one on the device at a time: 'sizes' goes to host memory
    middle = scrape(live)
    assert (residency(middle, "colors"), residency(middle, "sizes")) == ("device", "host")
    assert value(middle, "loraswap_adapter_evictions_total", adapter="sizes") == value(
        before, "loraswap_adapter_evictions_total", adapter="sizes") + 1
    ask(client, "sizes")  # back from host memory, not from its folder
    after = scrape(live)
    for source, change in (("host", 1), ("disk", 0)):
        assert value(after, "loraswap_adapter_loads_total", adapter="sizes", source=source) == value(
            middle, "loraswap_adapter_loads_total", adapter="sizes", source=source) + change
    assert value(after, "loraswap_max_loaded") == 1


def test_a_runtime_load_starts_on_disk_and_an_unload_takes_it_off_the_tiers(live, client):
    client.post("/load_lora_adapter", cast_to=str, body={"lora_name": "tint", "lora_path": str(live.extra / "tint")})
    try:
        assert residency(scrape(live), "tint") == "disk"
        ask(client, "tint")
        loaded = scrape(live)
        assert residency(loaded, "tint") == "device"
        assert value(loaded, "loraswap_adapter_loads_total", adapter="tint", source="disk") == 1
    finally:
        client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": "tint"})
    assert "tint" not in {labels["adapter"] for labels, _ in scrape(live)["loraswap_adapter_residency"]}


def test_lora_requests_info_names_the_running_and_the_waiting_adapters(live):
    """While a test holds the engine's lock the decode loop cannot step: the first request has
    joined the batch (running) and the next waits to, and /metrics reads both without the lock."""
    service = live.service
    prompt = [Message("user", QUESTIONS["colors"])]
    with service.engine.lock:
        running = service.chat("colors", prompt, SamplingParams(max_new_tokens=4))
        deadline = time.monotonic() + 10
        while running.admitted_at is None:
            assert time.monotonic() < deadline, "the request was never admitted"
            time.sleep(0.01)
        waiting = [service.chat("sizes", prompt, SamplingParams(max_new_tokens=4)),
                   service.chat("base", prompt, SamplingParams(max_new_tokens=4))]
        held = scrape(live)
    for stream in (running, *waiting):
        assert stream.wait(60).error is None
    (labels, stamp), = held["vllm:lora_requests_info"]
    assert labels == {"max_lora": "1", "running_lora_adapters": "colors", "waiting_lora_adapters": "sizes"}
    assert abs(stamp - time.time()) < 60
    assert (value(held, "vllm:num_requests_running"), value(held, "vllm:num_requests_waiting")) == (1, 2)
    assert value(held, "vllm:kv_cache_usage_perc") == value(held, "vllm:gpu_cache_usage_perc") == 1 / 32
    assert value(held, "loraswap_queue_depth") == 3
    idle = scrape(live)
    (labels, _), = idle["vllm:lora_requests_info"]
    assert (labels["running_lora_adapters"], labels["waiting_lora_adapters"]) == ("", "")
    assert value(idle, "vllm:num_requests_running") == value(idle, "vllm:num_requests_waiting") == 0


def test_a_busy_refusal_counts_under_its_adapter(live, client):
    """Refused before it is queued: never in the batch, and counted as 'busy'."""
    service = live.service
    before = value(scrape(live), "loraswap_requests_total", adapter="colors", status="busy")
    prompt = [Message("user", QUESTIONS["colors"])]
    with service.engine.lock:  # nothing ends while it is held, so the permits run out
        held = [service.chat("colors", prompt, SamplingParams(max_new_tokens=2)) for _ in range(service.config.max_queue)]
        with pytest.raises(openai.RateLimitError):
            ask(client, "colors")
    for stream in held:
        stream.wait(60)
    assert value(scrape(live), "loraswap_requests_total", adapter="colors", status="busy") == before + 1


def test_with_every_adapter_evicted_the_base_and_then_another_adapter_still_answer(live, client):
    """Evicting the last adapter on the device leaves peft's wrapper with none (serve/engine.py)."""
    ask(client, "sizes")
    assert live.service.unload("sizes") and live.service.engine.resident_names() == set()
    assert ask(client, "base").choices[0].finish_reason in ("stop", "length")
    assert ask(client, "colors").choices[0].message.content == "red"
    assert residency(scrape(live), "sizes") == "host"
