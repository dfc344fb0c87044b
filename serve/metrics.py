"""`/health` and `/metrics` (Prometheus' text format), for a scraper and for a router that picks pods.

Each app has its own `CollectorRegistry` (never prometheus_client's global one: several servers
may run in one process). What is counted as requests end (`RequestMetrics`, a Service's request
observer) lives in Counters and Histograms; what is true now (requests waiting and running, where
each adapter's weights are, how often they moved) is read from the service when scraped
(`LiveCollector`). Beside our own `loraswap_*` names, the four that the Gateway API inference
extension's endpoint picker reads from vLLM are exported with vLLM's meaning:
`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (and its
old name `vllm:gpu_cache_usage_perc`) and `vllm:lora_requests_info`. docs/fleet.md lists them all.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from typing import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from serve.api import ApiError
from serve.batcher import Stream
from serve.engine import ChatResult
from serve.mixes import is_mix
from serve.registry import BASE_NAME
from serve.service import Service

# vLLM's buckets (vllm/v1/metrics/loggers.py), so that one dashboard reads both servers.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
TIERS = ("device", "host", "disk")
"""Where an adapter's weights are: on the device, evicted to host memory, or only in its folder."""


def request_status(result: ChatResult, stream: Stream) -> str:
    """'ok', 'cancelled' (its client left), or the error code it ended with (serve.engine.ERROR_CODES)."""
    if result.error:
        return result.error_code or "server_error"
    return "cancelled" if stream.cancelled.is_set() else "ok"


def adapter_label(adapter: str) -> str:
    """The `adapter` label of a request: its adapter, or a mix's adapters without their scales
    (`json+sentiment` for `json*0.5+sentiment`), so that free-valued scales cannot grow the
    number of series without bound."""
    if not is_mix(adapter):
        return adapter
    return "+".join(piece.partition("*")[0].strip() for piece in adapter.split("+"))


class RequestMetrics:
    """Counts and times the requests a Service takes (it is a `serve.service.RequestObserver`),
    and knows which are waiting and which running now. Thread-safe: requests end on the decode loop."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("loraswap_requests", "Requests that ended or were refused before they were queued, by "
                                "adapter and status (ok, cancelled, busy, or an error code).", ["adapter", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("loraswap_prompt_tokens", "Prompt tokens of the requests that ended.", ["adapter"],
                                     registry=registry)
        self.generation_tokens = Counter("loraswap_generation_tokens", "Tokens generated for the requests that ended.",
                                         ["adapter"], registry=registry)
        self.first_token = Histogram("loraswap_time_to_first_token_seconds", "From queued to the first token's text.",
                                     ["adapter"], buckets=TTFT_BUCKETS, registry=registry)
        self.per_token = Histogram("loraswap_time_per_output_token_seconds", "Between one token's text and the next's.",
                                   ["adapter"], buckets=TPOT_BUCKETS, registry=registry)
        self.queue_time = Histogram("loraswap_request_queue_time_seconds", "From queued to joining the running batch.",
                                    ["adapter"], buckets=LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("loraswap_request_latency_seconds", "From queued to ended.", ["adapter"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self._held: dict[Stream, str] = {}
        self._lock = threading.Lock()

    def queued(self, adapter: str, stream: Stream) -> None:
        adapter = adapter_label(adapter)
        with self._lock:
            self._held[stream] = adapter
        stream.add_done_callback(partial(self._ended, adapter, stream))  # at once if it has ended already

    def refused(self, adapter: str, reason: str) -> None:
        self.requests.labels(adapter_label(adapter), reason).inc()

    def _ended(self, adapter: str, stream: Stream, result: ChatResult) -> None:
        with self._lock:
            self._held.pop(stream, None)
        self.requests.labels(adapter, request_status(result, stream)).inc()
        self.prompt_tokens.labels(adapter).inc(result.prompt_tokens)
        self.generation_tokens.labels(adapter).inc(result.new_tokens)
        self._observe_times(adapter, stream)

    def _observe_times(self, adapter: str, stream: Stream) -> None:
        times = stream.token_times
        if stream.admitted_at is not None:
            self.queue_time.labels(adapter).observe(stream.admitted_at - stream.queued_at)
        if times:
            self.first_token.labels(adapter).observe(times[0] - stream.queued_at)
        per_token = self.per_token.labels(adapter)
        for before, after in zip(times, times[1:]):
            per_token.observe(after - before)
        self.latency.labels(adapter).observe(time.monotonic() - stream.queued_at)

    def held(self) -> tuple[list[str], list[str]]:
        """The adapter of each request running now, and of each one waiting to join the batch."""
        with self._lock:
            held = list(self._held.items())
        running = [adapter for stream, adapter in held if stream.admitted_at is not None]
        waiting = [adapter for stream, adapter in held if stream.admitted_at is None]
        return running, waiting


class LiveCollector:
    """The gauges, and the engine's residency counters, read from the service at each scrape."""

    def __init__(self, service: Service, requests: RequestMetrics):
        self.service, self.requests = service, requests

    def collect(self) -> Iterator[Metric]:
        running, waiting = self.requests.held()
        yield from self._load(len(running), len(waiting))
        yield from self._residency()
        yield lora_requests_info(self.service.config.max_loaded, running, waiting)

    def _load(self, running: int, waiting: int) -> Iterator[Metric]:
        config = self.service.config
        yield gauge("loraswap_requests_running", "Requests in the running batch.", running)
        yield gauge("loraswap_requests_waiting", "Requests queued to join the running batch.", waiting)
        yield gauge("loraswap_queue_depth", "Requests held (waiting or running), of loraswap_queue_capacity; past it "
                    "requests get 429.", self.service.requests_held())
        yield gauge("loraswap_queue_capacity", "Requests the server holds at most (--max-queue).", config.max_queue)
        yield gauge("loraswap_batch_capacity", "Requests decoded together at most (--max-batch).", config.limits.max_batch)
        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting)
        # The decode batch's rows, not KV blocks: each running request holds one row (a
        # preallocated slot with the static cache), and --max-batch rows are all there are.
        usage = min(1.0, running / config.limits.max_batch)
        yield gauge("vllm:kv_cache_usage_perc", "Share of the decode batch's rows in use (1: all); loraswap has no KV "
                    "blocks (docs/fleet.md).", usage)
        yield gauge("vllm:gpu_cache_usage_perc", "The same as vllm:kv_cache_usage_perc (vLLM's old name).", usage)

    def _residency(self) -> Iterator[Metric]:
        entries = self.service.registry.servable()
        snapshot = self.service.engine.residency.snapshot()
        where = GaugeMetricFamily("loraswap_adapter_residency", "1 for the tier an adapter's weights are in: device, "
                                  "host (evicted) or disk (not loaded); 0 for the others.", labels=["adapter", "tier"])
        for entry in entries:
            tier = snapshot.tiers.get(entry.key, "disk")
            for each in TIERS:
                where.add_metric([entry.name, each], 1.0 if each == tier else 0.0)
        yield where
        loads = CounterMetricFamily("loraswap_adapter_loads", "Times an adapter's weights were put on the device, by "
                                    "source (disk, or host memory after an eviction).", labels=["adapter", "source"])
        for (name, source), count in sorted(snapshot.loads.items()):
            loads.add_metric([name, source], count)
        yield loads
        evictions = CounterMetricFamily("loraswap_adapter_evictions", "Times an adapter's weights were moved off the "
                                        "device to host memory.", labels=["adapter"])
        for name, count in sorted(snapshot.evictions.items()):
            evictions.add_metric([name], count)
        yield evictions
        yield gauge("loraswap_max_loaded", "Adapters resident on the device at once (--max-loaded).",
                    self.service.config.max_loaded)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def lora_requests_info(max_loaded: int, running: list[str], waiting: list[str]) -> GaugeMetricFamily:
    """vLLM's `vllm:lora_requests_info`: one series whose labels name the adapters of the running
    and of the waiting requests (each once, comma-separated, the base left out) and `max_lora`,
    and whose value is the wall-clock time they were read, by which an endpoint picker takes the
    latest of the series vLLM leaves behind (we export only the current one)."""
    info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    info.add_metric([str(max_loaded), _names(running), _names(waiting)], time.time())
    return info


def _names(adapters: list[str]) -> str:
    return ",".join(dict.fromkeys(a for a in adapters if a != BASE_NAME))


def add_fleet_routes(app: FastAPI, service: Service, authorize: Callable[[Request], None], open_metrics: bool) -> None:
    """`GET /health` (open) and `GET /metrics` (behind the API key unless `open_metrics`) on the app,
    with a registry of their own; the service reports its requests to it from now on."""
    registry = CollectorRegistry()
    requests = RequestMetrics(registry)
    registry.register(LiveCollector(service, requests))
    service.observe_requests(requests)

    @app.get("/health", include_in_schema=False)
    def health():
        # Open, as vLLM's is: a liveness probe sends no key, and the answer names nothing.
        problem = service.health()
        if problem is not None:
            return JSONResponse({"status": "unavailable", "reason": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request):
        # Behind the key by default: its labels name every adapter, which /v1/models shows only with it.
        if not open_metrics:
            try:
                authorize(request)
            except ApiError as err:
                return err.response()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
