"""Everything the web server does, callable without gradio or HTTP: chat, compare, the adapter table.

The Gradio UI (`serve/ui.py`) and the OpenAI-compatible API (`serve/api.py`) are thin layers
over one `Service`: one base, one registry (watching the store), one engine and one decode loop.
A bounded number of requests may be waiting or running; past it `submit` raises `BusyError`,
so a flood gets "busy" answers instead of an unbounded queue eating memory. The server's own
requests (the gate's replays) count against the same bound and take at most a quarter of it.

Versions (docs/versions.md): the promotion gate (serve/gate.py) checks each new version of a
served adapter before it goes live; `versions`, `gate_report`, `promote` and `rollback` are what
the Adapters tab and the /v1/adapters routes call.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol, Sequence

from adapters import AdapterStore, BaseConfig, BaseShape, LoadedBase, Message, load_base
from adapters.base import DEFAULT_BASE
from adapters.card import AdapterCard, ExamplePrompt, read_card
from adapters.cli import AT_LEAST_ONE, POSITIVE, opt
from serve.batcher import Stream
from serve.engine import ChatRequest, ChatResult, Engine, RequestError, SamplingParams, ServeLimits
from serve.gate import GateReport, GateSettings, PromotionGate
from serve.registry import BASE_NAME, AdapterEntry, AdapterRegistry, Rejection, UnknownAdapterError
from serve.routing import KERNELS, LoraRouter
from serve.slots import DecodeSettings

log = logging.getLogger(__name__)
MAX_COMPARE = 6


class BusyError(RuntimeError):
    """The server holds its maximum number of requests; the caller should retry later."""


class RequestObserver(Protocol):
    """What watches the requests a Service takes (serve/metrics.py). Called in the submitting
    thread; `adapter` is always a servable name or 'base' (an unknown name never gets this far)."""

    def queued(self, adapter: str, stream: Stream) -> None:
        """A request was queued; `stream` ends when it does."""

    def refused(self, adapter: str, reason: str) -> None:
        """A request was refused before it was queued: 'busy', or its RequestError's code."""


@dataclass(frozen=True)
class ServiceConfig:
    base: str = opt(DEFAULT_BASE, "Base model folder or hub id.")
    adapters: str | None = opt(None, "Adapter store (default: $ADAPTERS_DIR or adapters/store).")
    quantize: bool = opt(True, "Load the base in 4-bit NF4 with double quantization (QLoRA); --no-quantize "
                               "(or --no-quant) loads it unquantized.", aliases=("--no-quant",))
    trust_remote_code: bool = opt(False, "Run the Python code a base folder brings with it (config.json's "
                                         "auto_map); refused otherwise. Read that code first.")
    max_loaded: int = opt(8, "Adapters resident on the device at once; the least recently used beyond it go to host "
                             "memory.", range=AT_LEAST_ONE)
    max_queue: int = opt(32, "Requests waiting or running at once; more get 'busy' (BusyError).", range=AT_LEAST_ONE)
    limits: ServeLimits = field(default_factory=ServeLimits)
    watch_s: float = opt(1.0, "How often, in seconds, the store is scanned for new, replaced and deleted adapters.",
                         range=POSITIVE)
    reports: str = opt("reports", "Where `make eval` writes the adapter x task matrix the Adapters tab shows.")
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    """The decode loop's KV cache (static slots with captured CUDA graphs on a GPU, the growing
    cache elsewhere) and whether it runs deterministically."""
    lora_kernel: str = opt("auto", "What adds each row's LoRA delta: auto (a fused C++ kernel for float32 on the CPU, "
                                   "torch ops elsewhere) or torch (torch ops everywhere).", choices=KERNELS)
    gate: GateSettings = field(default_factory=GateSettings)
    """The promotion gate new versions of a served adapter pass before they go live (docs/versions.md)."""

    def __post_init__(self) -> None:
        for name in ("max_loaded", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.watch_s > 0:
            raise ValueError(f"watch_s must be > 0, got {self.watch_s}")
        LoraRouter.check_kernel(self.lora_kernel)


@dataclass
class Timing:
    """Latency and speed of one reply, as the compare view shows them."""

    first_token_s: float | None = None
    total_s: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass(frozen=True)
class AdapterRow:
    name: str
    task: str
    base: str
    rank: int | None
    alpha: float | None
    trainable_share: float | None
    metric: str
    trained: str
    status: str
    loss_curve: Path | None


@dataclass(frozen=True)
class VersionRow:
    """One stored version of an adapter, with its card's numbers, for the versions table."""

    version: str
    """The version folder's name: what `name@<version>` names."""
    created_at: str
    """When it was trained (the card's ISO time), '-' without a card."""
    live: bool
    candidate: bool
    """Held back by the promotion gate: served only as name@candidate."""
    rollback_target: bool
    """What `rollback` would make live."""
    status: str
    """'servable', 'rejected: <why>', or 'not checked' (checked on its first use)."""
    metric: str | None
    adapter_metric: float | None
    base_metric: float | None
    eval_examples: int | None
    r: int | None
    alpha: float | None
    learning_rate: float | None
    golden: int
    """Golden prompts on its card (0: it passes the gate unchecked)."""


@dataclass(frozen=True)
class VersionPointers:
    """Where a name's pointers stand after a promote or a rollback."""

    name: str
    live: str | None
    candidate: str | None
    rollback_target: str | None


BACKGROUND_SHARE = 4
"""The server's own requests hold at most 1/BACKGROUND_SHARE of `max_queue` (at least one place):
a card with hundreds of golden prompts checks them a few at a time and users keep the rest."""


class Service:
    def __init__(self, base: LoadedBase, registry: AdapterRegistry, config: ServiceConfig = ServiceConfig()):
        self.base, self.registry, self.config = base, registry, config
        self.engine = Engine(base, registry, max_loaded=config.max_loaded, limits=config.limits,
                             lora_kernel=config.lora_kernel, decode=config.decode)
        self.batcher = self.engine.loop()
        self._permits = threading.BoundedSemaphore(config.max_queue)
        self._held = 0
        self._held_lock = threading.Lock()
        self._observers: list[RequestObserver] = []
        self.gate: PromotionGate | None = None
        if config.gate.enabled:
            self.gate = PromotionGate(registry, self.generate_in_turn, self._count_tokens, config.gate)
            registry.set_gate(self.gate.submit)

    @classmethod
    def start(cls, config: ServiceConfig) -> "Service":
        """Load the base once, register the store's adapters and keep watching it (through the
        promotion gate, unless it is off)."""
        base = load_base(BaseConfig(config.base, quantize=config.quantize, trust_remote_code=config.trust_remote_code))
        registry = AdapterRegistry(AdapterStore(config.adapters), BaseShape.of(base.model, base.fingerprint))
        service = cls(base, registry, config)
        # Scanned once the gate is set, so a check a restart interrupted is taken up again.
        registry.refresh()
        registry.watch(config.watch_s)
        return service

    def close(self) -> None:
        """Stop watching the store, the gate and the decode loop; requests it still held end with an error."""
        self.registry.close()
        if self.gate is not None:
            self.gate.close()
        self.engine.close()

    def _count_tokens(self, text: str) -> int:
        return len(self.base.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- requests --------------------------------------------------------------------
    def submit(self, request: ChatRequest) -> Stream:
        """Prepare (template, tokenize) one request in the caller's thread and queue it.

        Raises UnknownAdapterError or RequestError for a request that cannot be served, and
        BusyError when the server already holds its maximum. Every queued request ends (its
        stream finishes, with or without an error), and its permit comes back then.
        """
        try:
            prepared = self.engine.prepare(request)
        except RequestError as err:
            self._refused(request.adapter, err.code)
            raise
        if not self._permits.acquire(blocking=False):
            self._refused(request.adapter, "busy")
            raise BusyError(f"server busy: {self.config.max_queue} requests are already waiting or running; retry shortly")
        self._count(+1)
        stream = self.batcher.submit(prepared)
        stream.add_done_callback(self._release)
        for observer in self._observers:
            observer.queued(request.adapter, stream)
        return stream

    def observe_requests(self, observer: RequestObserver) -> None:
        """Tell `observer` about every request submitted from now on."""
        self._observers.append(observer)

    def _refused(self, adapter: str, reason: str) -> None:
        for observer in self._observers:
            observer.refused(adapter, reason)

    def _count(self, change: int) -> None:
        with self._held_lock:
            self._held += change

    def _release(self, _: ChatResult | None) -> None:
        self._count(-1)
        self._permits.release()

    def requests_held(self) -> int:
        """Requests waiting or running now (each holds one of `max_queue` permits)."""
        with self._held_lock:
            return self._held

    def chat(self, adapter: str, messages: list[Message], params: SamplingParams) -> Stream:
        return self.submit(ChatRequest(adapter, tuple(messages), params))

    def compare(self, adapters: list[str], messages: list[Message], params: SamplingParams) -> list[Stream]:
        """The same prompt to several adapters, submitted together so they decode as one mixed batch."""
        if not 1 <= len(adapters) <= MAX_COMPARE:
            raise ValueError(f"compare takes 1 to {MAX_COMPARE} adapters, got {len(adapters)}")
        return self.submit_all([ChatRequest(name, tuple(messages), params) for name in adapters])

    def submit_all(self, requests: list[ChatRequest]) -> list[Stream]:
        """Submit requests together, so they decode as rows of one batch (compare, an API request's
        `n` choices); when one cannot be queued, the ones already queued are cancelled and its
        error raised (submit's)."""
        streams: list[Stream] = []
        try:
            for request in requests:
                streams.append(self.submit(request))
        except Exception:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    def background_places(self) -> int:
        """How many of the `max_queue` places the server's own requests hold at most."""
        return max(1, self.config.max_queue // BACKGROUND_SHARE)

    def generate_in_turn(self, requests: Sequence[ChatRequest], timeout: float) -> list[ChatResult]:
        """The server's own requests (the promotion gate's replays), inside `max_queue`: at most
        `background_places()` at a time, in order, each waiting for a free place where a user's
        request would be refused one. One result per request (a bad one gets an error result);
        TimeoutError when `timeout` seconds pass first, with what it still ran cancelled."""
        deadline = time.monotonic() + timeout
        places = self.background_places()
        results: list[ChatResult] = []
        for start in range(0, len(requests), places):
            results.extend(self._run_in_places(requests[start:start + places], deadline))
        return results

    def _run_in_places(self, requests: Sequence[ChatRequest], deadline: float) -> list[ChatResult]:
        streams: list[Stream] = []
        try:
            for request in requests:
                streams.append(self._queue_waiting(request, deadline))
            return [stream.wait(max(0.0, deadline - time.monotonic())) for stream in streams]
        except TimeoutError:
            for stream in streams:
                stream.cancel()  # its place comes back when the loop ends it
            raise

    def _queue_waiting(self, request: ChatRequest, deadline: float) -> Stream:
        if not self._permits.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"no free place in the queue for a request to {request.adapter!r} in time")
        self._count(+1)
        try:
            stream = self.batcher.submit(request)  # a closed loop answers with a finished stream
        except BaseException:
            self._release(None)
            raise
        stream.add_done_callback(self._release)
        return stream

    # -- adapters --------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """'base' first, then every servable adapter."""
        return self.registry.available()

    def adapter_rows(self) -> list[AdapterRow]:
        rows = [AdapterRow(BASE_NAME, "-", self.config.base, None, None, None, "-", "-", "servable (the base alone)", None)]
        on_device = self.engine.resident_names()
        for entry in self.registry.servable():
            card = entry.card
            curve = entry.path / "loss.png"
            rows.append(AdapterRow(
                name=entry.name,
                task=card.task if card else "-",
                base=card.base.path if card else "-",
                rank=entry.rank,
                alpha=card.lora.alpha if card else None,
                trainable_share=card.lora.trainable_share if card else None,
                metric=f"{card.metric.name} {card.metric.base:.3f} -> {card.metric.adapter:.3f}" if card and card.metric else "-",
                trained=_when(card.created_at) if card else "-",
                status="servable, on device" if entry.name in on_device else "servable",
                loss_curve=curve if curve.is_file() else None,
            ))
        for rejection in self.registry.rejected():
            rows.append(AdapterRow(rejection.name, "-", "-", None, None, None, "-", "-", f"rejected: {rejection.reason}", None))
        return rows

    def choice_label(self, name: str) -> str:
        """'name (task, exact match 0.00 -> 0.95)' for the adapter pickers."""
        if name == BASE_NAME:
            return "base (no adapter)"
        try:
            entry = self.registry.resolve(name)
        except KeyError:
            return name
        card = entry.card if entry else None
        if card is None or card.metric is None:
            return name
        return f"{name} ({card.task}, {card.metric.name} {card.metric.base:.2f} -> {card.metric.adapter:.2f})"

    def eval_matrix(self) -> tuple[list[str], list[list]] | None:
        """The latest `make eval` matrix as (headers, rows) for the adapters served now; None when
        it was never run, cannot be read, or covers none of them (another store's report)."""
        from serve.reports import read_matrix

        try:
            matrix = read_matrix(Path(self.config.reports))
        except (OSError, ValueError, TypeError) as err:
            log.warning("eval matrix in %s not shown: %s", self.config.reports, err)
            return None
        served = set(self.model_names())
        models = [m for m in matrix.models if m in served] if matrix else []
        if not [m for m in models if m != BASE_NAME]:
            return None
        rows = [[m, *[f"{v:.3f}" + (" *" if matrix.trained_on.get(m) == t else "") for t, v in zip(matrix.tasks, matrix.row(m))]]
                for m in models]
        return ["model", *matrix.tasks], rows

    def refresh(self) -> None:
        self.registry.refresh()

    def unload(self, name: str) -> bool:
        return self.engine.evict(name)

    def load_runtime_adapter(self, name: str, folder: Path, replace: bool = False) -> AdapterEntry | Rejection:
        """Serve the adapter in `folder` as `name` until `unload_runtime_adapter`, checked as the
        store's are; `folder` must already be confined to where adapters may be read
        (serve/management.py). Its weights load on its first request, as a store adapter's do."""
        old = self.registry.resolve(name) if replace and name in self.registry.runtime_names() else None
        outcome = self.registry.add_runtime(name, folder, replace_runtime=replace)
        if old is not None and isinstance(outcome, AdapterEntry):
            self.engine.forget(old.key)
        return outcome

    def unload_runtime_adapter(self, name: str) -> AdapterEntry | None:
        """Stop serving a runtime-loaded adapter and free its weights; its folder is left as it is.
        None when `name` was not loaded at runtime."""
        entry = self.registry.remove_runtime(name)
        if entry is not None:
            self.engine.forget(entry.key)
        return entry

    # -- versions ------------------------------------------------------------------
    def versions(self, name: str) -> list[VersionRow]:
        """Every stored version of `name`, oldest first, with its card's numbers side by side.
        UnknownAdapterError for a name the store does not serve."""
        self._require_store_name(name)
        store, registry = self.registry.store, self.registry
        live, candidate = store.live_version(name), registry.candidate(name)
        target = store.rollback_target(name)
        return [_version_row(folder, registry.checked_version(name, folder.name), live, candidate, target)
                for folder in store.versions(name)]

    def gate_report(self, name: str) -> GateReport | None:
        """The promotion gate's last decision about `name` (kept in the store, so it outlives a
        restart); None when it decided none."""
        self._require_store_name(name)
        text = self.registry.store.read_note(name)
        return GateReport.from_json(text) if text else None

    def promote(self, name: str, version: str | None = None) -> VersionPointers:
        """Make `version` of `name` live (None: its candidate), in one atomic pointer flip; a
        request already running keeps the version it started on. UnknownAdapterError for a name
        not served from the store; NoVersionError (serve.registry) when there is no such version,
        no candidate, or the version cannot be served."""
        self.registry.promote(name, version)
        return self.pointers(name)

    def rollback(self, name: str) -> VersionPointers:
        """Make the version live before the current one live again (a second rollback undoes the
        first); errors as `promote`'s, NoVersionError when there is no earlier version."""
        self.registry.rollback(name)
        return self.pointers(name)

    def pointers(self, name: str) -> VersionPointers:
        store = self.registry.store
        return VersionPointers(name, store.live_version(name), self.registry.candidate(name), store.rollback_target(name))

    def _require_store_name(self, name: str) -> None:
        if self.registry.live_entry(name) is None:
            raise UnknownAdapterError(name, self.registry.available())

    def examples(self, names: list[str]) -> list[str]:
        """The example user prompts on the cards of the adapters named (versions too: 'name@...'),
        in order, each once. 'base', and names not servable, add none."""
        return [example.user for example in self.example_prompts(names)]

    def example_prompts(self, names: list[str]) -> list[ExamplePrompt]:
        """As `examples`, with each example's system prompt (None where its eval data has none)."""
        prompts: dict[str, ExamplePrompt] = {}
        for name in names:
            card = self._card_of(name)
            for example in card.examples if card else []:
                prompts.setdefault(example.user, example)
        return list(prompts.values())

    def _card_of(self, name: str) -> AdapterCard | None:
        try:
            entry = self.registry.resolve(name)
        except UnknownAdapterError:
            return None  # a name gone since the page listed it adds no examples
        return entry.card if entry else None

    def health(self) -> str | None:
        """Why the server cannot serve now; None when it can."""
        if not self.batcher.is_alive():
            return "the decode loop has stopped"
        return None


def timed(stream: Stream, started: float, timing: Timing):
    """Iterate a stream's pieces while filling in its timing."""
    for piece in stream:
        if timing.first_token_s is None:
            timing.first_token_s = time.perf_counter() - started
        timing.total_s = time.perf_counter() - started
        yield piece
    result: ChatResult = stream.result
    timing.total_s = time.perf_counter() - started
    timing.tokens = result.new_tokens


def divergence(reference: str, answer: str) -> int | None:
    """Index of the first word where `answer` departs from `reference`; None when they agree."""
    ref, ans = reference.split(), answer.split()
    for i, (a, b) in enumerate(zip(ref, ans)):
        if a != b:
            return i
    return None if len(ref) == len(ans) else min(len(ref), len(ans))


def _version_row(folder: Path, checked: AdapterEntry | Rejection | None, live: str | None, candidate: str | None,
                 target: str | None) -> VersionRow:
    card, problem = _read_card_or_problem(folder)
    if isinstance(checked, Rejection):
        status = f"rejected: {checked.reason}"
    else:
        status = "servable" if checked is not None or folder.name == live else "not checked"
    if problem:
        status = f"{status}; {problem}"
    metric = card.metric if card else None
    return VersionRow(
        version=folder.name, created_at=card.created_at if card else "-", live=folder.name == live,
        candidate=folder.name == candidate, rollback_target=folder.name == target, status=status,
        metric=metric.name if metric else None, adapter_metric=metric.adapter if metric else None,
        base_metric=metric.base if metric else None, eval_examples=metric.eval_examples if metric else None,
        r=card.lora.r if card else None, alpha=card.lora.alpha if card else None,
        learning_rate=card.training.learning_rate if card else None, golden=len(card.golden) if card else 0)


def _read_card_or_problem(folder: Path) -> tuple[AdapterCard | None, str | None]:
    try:
        return read_card(folder), None
    except ValueError as err:  # a card that will not read is shown as such, the listing goes on
        return None, "no readable card" if not (folder / "card.json").is_file() else str(err)


def _when(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso
