"""The serving engine: one 4-bit base, adapters held by key in the LoRA router's stacks, and every
request routed to its own adapter per row (`serve/routing.py`), never by a shared `set_adapter`.

Only this module touches peft adapter state. Deciding which adapters stay resident (the LRU in
`AdapterCache`) is kept apart from loading and unloading them (`Engine.make_resident`). An
adapter's trained token rows (`trainable_token_indices`) stay out of peft and are applied per
row by `serve/token_rows.py`. Every generation, whoever asks (the server, `serve chat`,
`make eval`, the benches), runs through one decode loop (`serve/batcher.py`): `Engine.generate`
is a submit-and-wait over it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from adapters.base import LoadedBase, end_of_turn_id
from adapters.chat import Message, encode_prompt
from adapters.compat import BaseShape, TokenRows, read_config, read_tensors, token_rows_of
from adapters.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHAT_TEMPLATE_FILE
from adapters.weights import AdapterWeights, adapter_weights
from serve.grammar import GrammarError, Grammars, ResponseFormat
from serve.registry import AdapterEntry, AdapterRegistry, UnknownAdapterError
from serve.mixes import MixError, is_mix, parse_mix
from serve.routing import LoraRouter, RowKey
from serve.slots import DecodeSettings
from serve.token_rows import TokenRowRouter

if TYPE_CHECKING:
    from serve.batcher import ContinuousBatcher, Stream

log = logging.getLogger(__name__)

SEED_RANGE = 2**64
"""A request's seed is one of torch.Generator's: 0 <= seed < 2**64."""
MAX_LOGPROBS = 20
"""The most alternatives a request may ask log-probabilities for (OpenAI's limit)."""
WRAPPERS = "wrappers"
"""The name of the rank-1 peft adapters that only give base modules their LoRA wrappers (`Engine._wrap`)."""


class RequestError(ValueError):
    """A request that cannot be served as asked: the caller's fault (an HTTP 400)."""

    code = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(RequestError):
    """The prompt leaves no room for a reply in the model's (or the decode cache's) context."""

    code = "context_length_exceeded"


class AdapterLoadError(RuntimeError):
    """A registered adapter whose weights could not be put on the device; its requests fail alone."""

    code = "adapter_unavailable"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 decodes greedily."""
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int | None = None
    """Seeded sampling draws from the request's own generator: the same seed, the same reply."""
    stop: tuple[str, ...] = ()
    """The reply ends before the first of these strings."""
    logprobs: int | None = None
    """None: no log-probabilities; k: each reply token's, and the k likeliest alternatives' (0 to MAX_LOGPROBS)."""
    ignore_eos: bool = False
    """vLLM's extension: stop tokens do not end the reply (stop strings still do), so it runs to
    max_new_tokens; benchmarks use it to compare batches of equal lengths."""

    def __post_init__(self) -> None:
        for name, ok in (("temperature", math.isfinite(self.temperature) and self.temperature >= 0),
                         ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS),
                         ("top_p", math.isfinite(self.top_p) and 0 < self.top_p <= 1),
                         ("top_k", self.top_k >= 0), ("max_new_tokens", self.max_new_tokens > 0),
                         ("seed", self.seed is None or 0 <= self.seed < SEED_RANGE)):
            if not ok:
                raise RequestError(f"{name}: {getattr(self, name)!r} is out of range", name)


@dataclass(frozen=True)
class ServeLimits:
    max_new_tokens: int = 256
    """Server-side cap: larger requests are capped, not refused."""
    max_batch: int = 32


@dataclass(frozen=True)
class ChatRequest:
    adapter: str
    """An adapter name, 'base' for the base alone, or a mix in the compact spelling
    (`json*0.5+sentiment`: serve/mixes.py)."""
    messages: tuple[Message, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    response_format: ResponseFormat | None = None
    """JSON output, constrained token by token (serve/grammar.py); None: free text."""
    prompt: str | None = None
    """A raw prompt, tokenized as it is with no chat template (`/v1/completions`); then `messages` is empty."""


@dataclass(frozen=True)
class Prepared:
    """A request checked, templated and tokenized (`Engine.prepare`): all the decode loop needs."""

    request: ChatRequest
    entry: AdapterEntry | None
    """None: the base alone."""
    prompt: list[int]
    max_new: int
    """The reply's token budget: the request's, capped by the server and by the model's context."""
    stop_ids: frozenset[int] = frozenset()
    """Tokens that end this reply beyond the base's own: the end of turn of the adapter's chat
    template and the stop ids its card records (`Engine.stop_ids`)."""
    grammar: object | None = None
    """The compiled `response_format` (`Grammars.compile`); None: free text."""
    mix: tuple[tuple[AdapterEntry, float], ...] = ()
    """A mix's (adapter, scale) parts, `entry` being the first; empty for one adapter at its trained
    strength or the base. The first part's chat template and token rows serve the reply."""

    @property
    def row_key(self) -> RowKey:
        """How the router sees this request's rows: a key, (key, scale) pairs, or None for the base."""
        if self.mix:
            return tuple((entry.key, scale) for entry, scale in self.mix)
        return self.entry.key if self.entry else None

    @property
    def entries(self) -> tuple[AdapterEntry, ...]:
        """Every adapter whose weights this request needs on the device."""
        if self.mix:
            return tuple(entry for entry, _ in self.mix)
        return (self.entry,) if self.entry else ()

    @property
    def adapter_name(self) -> str:
        """What a reply says wrote it: the adapter's name, the mix's spelling, or 'base'."""
        if self.mix:
            return "+".join(entry.name if scale == 1.0 else f"{entry.name}*{scale:g}" for entry, scale in self.mix)
        return self.entry.name if self.entry else "base"


ERROR_CODES = ("model_not_found", "context_length_exceeded", "invalid_request_error", "adapter_unavailable",
               "server_error")
"""What `ChatResult.error_code` may say; the API maps each to an HTTP status."""


@dataclass(frozen=True)
class ChatResult:
    adapter: str
    text: str = ""
    new_tokens: int = 0
    error: str | None = None
    prompt_tokens: int = 0
    finish_reason: str = "stop"
    """'length' when the reply hit its token limit, 'stop' otherwise (EOS, a stop string, cancelled)."""
    error_code: str | None = None
    """With `error`: one of ERROR_CODES."""
    error_param: str | None = None
    """With `error`: the request field at fault, where there is one (`messages[0].content`)."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """With `SamplingParams.logprobs`: one per reply token, in order."""

    @classmethod
    def failed(cls, adapter: str, err: BaseException, text: str = "", new_tokens: int = 0) -> "ChatResult":
        """The result of a request that `err` ended; the code says whose fault it was."""
        if isinstance(err, UnknownAdapterError):
            code = "model_not_found"
        else:
            code = getattr(err, "code", "server_error")
        return cls(adapter, text, new_tokens, error=str(err), error_code=code, error_param=getattr(err, "param", None))


@dataclass(frozen=True)
class TokenLogprob:
    """One reply token's log-probability under the model's own distribution (its logits' log-softmax,
    before temperature, top-k, top-p or a grammar's mask), and its likeliest alternatives'."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token, log-probability), likeliest first."""


def _token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> tuple[TokenLogprob, ...]:
    """logits [tokens, vocab], row i predicting tokens[i]: each token's log-softmax and its `top` likeliest."""
    logprobs = torch.log_softmax(logits.float(), -1)
    best = logprobs.topk(top, dim=-1) if top else None
    return tuple(TokenLogprob(token, float(logprobs[i, token]),
                              tuple(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else ())
                 for i, token in enumerate(tokens))


def cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    """The text before the first stop string it contains, or None when it contains none."""
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None


class AdapterCache:
    """Which adapter keys are resident, least recently used first; pure bookkeeping, no tensors."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("max_loaded must be > 0")
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()

    def resident(self) -> list[str]:
        return list(self._keys)

    def touch(self, key: str) -> bool:
        """Mark a key used; True when it was already resident (loading it again is a no-op)."""
        hit = key in self._keys
        self._keys[key] = None
        self._keys.move_to_end(key)
        return hit

    def remove(self, key: str) -> None:
        self._keys.pop(key, None)

    def holds(self, key: str) -> bool:
        """Whether the key is resident (a hint when asked outside the engine lock)."""
        return key in self._keys

    def evictions(self, pinned: set[str]) -> list[str]:
        """Keys to unload to get back within capacity, oldest first, never a pinned one."""
        over = len(self._keys) - self.capacity
        victims = [k for k in self._keys if k not in pinned][: max(0, over)]
        for key in victims:
            del self._keys[key]
        return victims


def read_adapter(entry: AdapterEntry, base: BaseShape) -> tuple[AdapterWeights, TokenRows]:
    """An adapter's LoRA weights and trained token rows, from one read of its folder (CPU tensors)."""
    config = read_config(entry.path / ADAPTER_CONFIG)
    tensors = read_tensors(entry.path / ADAPTER_WEIGHTS)
    return adapter_weights(config, tensors), token_rows_of(config, tensors, base)


class Prefetched:
    """Adapters read ahead of their load, by key, the oldest dropped beyond `capacity`; thread-safe
    (request threads put, the decode loop takes)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[AdapterWeights, TokenRows]] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: str, item: tuple[AdapterWeights, TokenRows]) -> None:
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def take(self, key: str) -> tuple[AdapterWeights, TokenRows] | None:
        with self._lock:
            return self._items.pop(key, None)


@dataclass(frozen=True)
class Residency:
    """A copy of `ResidencyLog` at one moment."""

    tiers: dict[str, str]
    """Adapter key -> 'device' or 'host'; a key in neither is only on disk."""
    loads: dict[tuple[str, str], int]
    """(adapter name, 'disk' or 'host') -> times its weights were put on the device from there."""
    evictions: dict[str, int]
    """Adapter name -> times its weights were moved off the device to host memory."""


class ResidencyLog:
    """Where each adapter key's weights are, and how often they moved, as the engine's residency
    code reports it. It has its own lock, so the metrics read it from any thread at any time; the
    engine's `lock` is held for a whole decode step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tiers: dict[str, str] = {}
        self._loads: Counter[tuple[str, str]] = Counter()
        self._evictions: Counter[str] = Counter()

    def loaded(self, key: str, name: str, source: str) -> None:
        with self._lock:
            self._tiers[key] = "device"
            self._loads[(name, source)] += 1

    def evicted(self, key: str, name: str) -> None:
        with self._lock:
            self._tiers[key] = "host"
            self._evictions[name] += 1

    def dropped(self, key: str) -> None:
        with self._lock:
            self._tiers.pop(key, None)

    def snapshot(self) -> Residency:
        with self._lock:
            return Residency(dict(self._tiers), dict(self._loads), dict(self._evictions))


class Engine:
    """Generates replies for requests that each name their own adapter, through one decode loop."""

    def __init__(self, base: LoadedBase, registry: AdapterRegistry, max_loaded: int = 8, limits: ServeLimits = ServeLimits(),
                 lora_kernel: str = "auto", decode: DecodeSettings = DecodeSettings()):
        LoraRouter.check_kernel(lora_kernel)  # a bad choice fails here, not at the first adapter request
        self.base, self.registry, self.limits, self.decode = base, registry, limits, decode
        self.lora_kernel = lora_kernel
        """Which fused kernel adds the routed LoRA delta where it applies (`serve.routing.KERNELS`)."""
        self.cache = AdapterCache(max_loaded)
        self._model: PeftModel | None = None
        self._router: LoraRouter | None = None
        self._tokens = TokenRowRouter(base.model, per_row=decode.deterministic)
        """The resident adapters' trained token rows, applied per row (serve/token_rows.py)."""
        self._host: dict[str, AdapterWeights] = {}
        """Evicted adapters' weights kept in host memory: reloading them reads no file."""
        self._loaded: dict[str, AdapterWeights] = {}
        """Adapters loaded since the last restack, not yet in the router's stacks."""
        self._prefetched = Prefetched(max_loaded)
        """Adapter files read ahead of their load, outside the lock (`prefetch`)."""
        self._wrapped: set[str] = set()
        """Base modules that have a LoRA wrapper (`_wrap`)."""
        self.lock = threading.Lock()
        """Held while the model runs or its adapters change: the decode loop holds it for a step."""
        self._templates: dict[str, str | None] = {}
        self._names: dict[str, str] = {}
        self._stops: dict[str, frozenset[int]] = {}
        """Adapter key -> its stop tokens (`stop_ids`); a key is one published version, so never stale."""
        """Adapter key -> adapter name (keys escape '.', so a name is not recoverable from its key)."""
        self.loads_from_disk = 0
        self.residency = ResidencyLog()
        """Where each adapter's weights are and how often they moved, for the metrics (serve/metrics.py)."""
        self.decode_threads: int | None = None
        """Intra-op threads the decode loop chose for this engine (serve/batcher.py)."""
        self._loop: ContinuousBatcher | None = None
        self._loop_lock = threading.Lock()
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    # -- adapter residency -------------------------------------------------------------
    def _load(self, entry: AdapterEntry) -> None:
        """Ready one adapter's weights for the next restack; on failure nothing of it stays."""
        try:
            weights, source = self._take_weights(entry)
            weights.check_finite()
            self._wrap(weights.modules())
            self._loaded[entry.key] = weights
            self.residency.loaded(entry.key, entry.name, source)
        except Exception as err:
            self._discard(entry.key)
            raise AdapterLoadError(f"adapter {entry.name!r} could not be loaded from {entry.path}: "
                                   f"{type(err).__name__}: {err}") from err

    def _take_weights(self, entry: AdapterEntry) -> tuple[AdapterWeights, str]:
        """The adapter's weights from host memory (evicted before), else read ahead (`prefetch`) or
        now from its folder; (weights, where from)."""
        if entry.key in self._host:
            return self._host.pop(entry.key), "host"
        self.loads_from_disk += 1
        weights, rows = self._prefetched.take(entry.key) or read_adapter(entry, self.registry.base)
        self._tokens.add(entry.key, rows)
        return weights, "disk"

    def _wrap(self, modules: set[str]) -> None:
        """Give peft LoRA wrappers to the base modules that have none yet, through a rank-1 adapter
        of their own that nothing routes to: the router patches every wrapper's forward and adds
        each row's delta from its stacks, so served adapters never enter peft (a walk over every
        module of the model per load, and again per eviction, would be most of a miss's time)."""
        missing = sorted(modules - self._wrapped)
        if not missing:
            return
        config = LoraConfig(r=1, lora_alpha=1, target_modules=missing, inference_mode=True, task_type="CAUSAL_LM")
        if self._model is None:
            self._model = get_peft_model(self.base.model, config, adapter_name=WRAPPERS)
        else:
            self._model.add_adapter(f"{WRAPPERS}-{len(self._model.peft_config)}", config)
        self._model.eval()
        self._wrapped.update(missing)

    def prefetch(self, entries: Sequence[AdapterEntry]) -> None:
        """Read the files of adapters that are neither resident nor in host memory, in the calling
        thread: a queued request's own (`ContinuousBatcher.submit`, after the server admitted it,
        so a refused request reads nothing), so its load under the engine lock copies tensors and
        reads nothing. A read that fails is left for the load to repeat and report."""
        for entry in entries:
            if entry.key in self._host or self.cache.holds(entry.key) or entry.key in self._prefetched:
                continue
            try:
                self._prefetched.put(entry.key, read_adapter(entry, self.registry.base))
            except Exception:  # noqa: BLE001 -- the load under the lock raises it with the adapter's name
                log.debug("prefetch of %s failed; its load will report why", entry.name, exc_info=True)

    def _discard(self, key: str) -> None:
        """Forget a key everywhere (stacks to be, LRU, host copies), whatever state a failed load left."""
        self.cache.remove(key)
        self._host.pop(key, None)
        self._loaded.pop(key, None)
        self._prefetched.take(key)
        self._templates.pop(key, None)
        self._tokens.remove(key)
        self.residency.dropped(key)

    def _unload(self, key: str) -> None:
        weights = self._loaded.pop(key, None) or self._router.weights_of(key)
        self._host[key] = weights.to("cpu")  # a copy: the stacks' storage is freed at the restack
        self.residency.evicted(key, self._names.get(key, key))

    def make_resident(self, entries: list[AdapterEntry]) -> dict[str, AdapterLoadError]:
        """Load what a step needs, evict the least recently used beyond the cap, and restack the
        routed weights when the resident set changed. Call under `lock`.

        Returns the adapters that failed to load, by key: nothing of them stays loaded, and the
        others are resident as asked.
        """
        needed = {e.key: e for e in entries}
        failed: dict[str, AdapterLoadError] = {}
        changed = False
        for key, entry in needed.items():
            if self.cache.touch(key):
                continue
            try:
                self._load(entry)
            except AdapterLoadError as err:
                log.error("%s", err)
                failed[key] = err
                continue
            self._names[key] = entry.name
            changed = True
        for key in self.cache.evictions(pinned=set(needed) - set(failed)):
            self._unload(key)
            changed = True
        if self._model is not None and (changed or failed or self._router is None):
            self._router = self._router or LoraRouter(self._model, self.base.compute_dtype, kernel=self.lora_kernel,
                                                      per_row=self.decode.deterministic)
            self._restack()
        return failed

    def _restack(self) -> None:
        """Stack the resident adapters' weights again: the LoRA router's and the token rows'."""
        self._router.rebuild(self.cache.resident(), self._loaded)
        self._loaded.clear()
        self._tokens.rebuild(self.cache.resident())

    def route(self, keys: list[RowKey], replayed: bool = False) -> torch.nn.Module:
        """The model to run for rows that use these adapter keys, or mixes of them (None: the base alone).
        replayed: the step is captured as a CUDA graph, or is the run before its capture (`LoraRouter.set_rows`)."""
        if self._model is None:
            return self.base.model
        self._router.set_rows(keys, replayed)
        # A mix's token rows are its first part's (the adapter whose chat template it speaks in).
        self._tokens.set_rows([key[0][0] if isinstance(key, tuple) else key for key in keys])
        return self._model

    @property
    def router(self) -> LoraRouter | None:
        """The router over the resident adapters (None before the first adapter loads)."""
        return self._router

    def step_signature(self) -> tuple[tuple, object]:
        """What a captured decode step depends on beyond its inputs' values: the route of the
        current rows, and the stacks' version (their addresses)."""
        if self._router is None:
            return ("plain",), None
        return (self._router.signature() + self._tokens.signature(),
                (id(self._router), self._router.version, self._tokens.version))

    def resident(self) -> list[str]:
        return self.cache.resident()

    def resident_names(self) -> set[str]:
        """Names of the adapters whose weights are on the device now."""
        return {self._names[key] for key in self.cache.resident()}

    def evict(self, name: str) -> bool:
        """Move an adapter's weights off the device (kept in host memory); True when it was resident.

        A request still running on it is unaffected: its next step makes it resident again.
        """
        with self.lock:
            keys = [k for k in self.cache.resident() if self._names[k] == name]
            for key in keys:
                self.cache.remove(key)
                self._unload(key)
            if keys and self._router is not None:
                self._restack()
        return bool(keys)

    def forget(self, key: str) -> None:
        """Drop one adapter version's weights from the device and from host memory (its runtime
        load was undone). A request still running on it loads it from its folder again."""
        with self.lock:
            was_resident = key in self.cache.resident()
            self._discard(key)
            if was_resident and self._router is not None:
                self._restack()

    # -- requests ------------------------------------------------------------------------
    def _template(self, entry: AdapterEntry | None) -> str | None:
        """The adapter's saved chat template, read once per version; None means the base's own."""
        if entry is None:
            return None
        if entry.key not in self._templates:
            file = entry.path / CHAT_TEMPLATE_FILE
            self._templates[entry.key] = file.read_text() if file.is_file() else None
        return self._templates[entry.key]

    def prepare(self, request: ChatRequest) -> Prepared:
        """Resolve the adapter, render the chat template and tokenize: in the caller's thread, so
        a long prompt never holds up the decode loop. Raises UnknownAdapterError or RequestError."""
        entry, mix = self._resolve(request.adapter)
        prompt = self._encode(request, entry)
        # Capped, never refused: by the server's limit and by the room the context leaves.
        max_new = min(request.params.max_new_tokens, self.limits.max_new_tokens)
        context = getattr(self.base.model.config, "max_position_embeddings", None)
        if context:
            if len(prompt) >= context:
                raise ContextLengthError(f"prompt is {len(prompt)} tokens, which fills the model's context of {context} tokens",
                                         "messages" if request.prompt is None else "prompt")
            max_new = min(max_new, context - len(prompt))
        stops = frozenset().union(*(self.stop_ids(e) for e, _ in mix)) if mix else self.stop_ids(entry)
        return Prepared(request, entry, prompt, max_new, stops, self._compile(request.response_format), mix)

    def _resolve(self, spelling: str) -> tuple[AdapterEntry | None, tuple[tuple[AdapterEntry, float], ...]]:
        """The lead adapter (None: the base) and, for a mix or a scaled adapter, its resolved parts."""
        if not is_mix(spelling):
            return self.registry.resolve(spelling), ()
        try:
            parsed = parse_mix(spelling)
        except MixError as err:
            raise RequestError(str(err), err.param) from err
        if parsed.is_plain():
            return self.registry.resolve(parsed.parts[0].name), ()
        mix = tuple((self.registry.resolve(part.name), part.scale) for part in parsed.parts)
        keys = [entry.key for entry, _ in mix]
        if len(set(keys)) != len(keys):  # two spellings of one version (`json` and `json@<its version>`)
            raise RequestError(f"model: {spelling!r} names one adapter version twice", "model")
        return mix[0][0], mix

    @property
    def grammars(self) -> Grammars:
        """The response-format compiler for this base's tokenizer, made on the first constrained request."""
        with self._grammars_lock:
            if self._grammars is None:
                vocab = self.base.model.get_output_embeddings().weight.shape[0]
                self._grammars = Grammars(self.base.tokenizer, vocab)
            return self._grammars

    def _compile(self, fmt: ResponseFormat | None):
        if fmt is None:
            return None
        try:
            return self.grammars.compile(fmt)
        except GrammarError as err:
            raise RequestError(str(err), err.param) from err

    def stop_ids(self, entry: AdapterEntry | None) -> frozenset[int]:
        """The tokens that end a reply for this adapter (None: the base alone): the base's, the end
        of turn its own chat template writes, and those its card records; found once per version."""
        if entry is None:
            return self.base.stop_token_ids
        if entry.key not in self._stops:
            card_chat = entry.card.chat if entry.card is not None else None
            recorded = frozenset(card_chat.stop_token_ids) if card_chat is not None else frozenset()
            template = self._template(entry)
            own = end_of_turn_id(self.base.tokenizer, template) if template is not None else None
            self._stops[entry.key] = self.base.stop_token_ids | recorded | ({own} - {None})
        return self._stops[entry.key]

    def _encode(self, request: ChatRequest, entry: AdapterEntry | None) -> list[int]:
        if request.prompt is not None:
            return self._encode_raw(request.prompt)
        for i, message in enumerate(request.messages):
            try:
                message.content.encode("utf-8")
            except UnicodeEncodeError as err:  # a lone surrogate: a string cut inside a UTF-16 pair
                raise RequestError(f"messages[{i}].content is not valid Unicode text ({err.reason} at "
                                   f"character {err.start})", f"messages[{i}].content") from err
        try:
            return encode_prompt(self.base.tokenizer, request.messages, self._template(entry))
        except Exception as err:  # a template's own error (a role it refuses, a raise_exception) is the request's
            raise RequestError(f"messages: the chat template could not render them: {type(err).__name__}: {err}",
                               "messages") from err

    def _encode_raw(self, prompt: str) -> list[int]:
        """A raw prompt's tokens, with the tokenizer's own special tokens (a BOS where it adds one)."""
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(f"prompt is not valid Unicode text ({err.reason} at character {err.start})", "prompt") from err
        ids = self.base.tokenizer(prompt)["input_ids"]
        if not ids:
            raise RequestError("prompt: empty (it encodes to no tokens)", "prompt")
        return ids

    # -- scoring -------------------------------------------------------------------------
    def score(self, adapter: str, messages: Sequence[Message], reply_tokens: Sequence[int],
              top: int = 1) -> tuple[TokenLogprob, ...]:
        """Each reply token's log-probability under `adapter` (a name, a mix or 'base') after the
        messages, teacher-forced in one forward pass, with its `top` likeliest alternatives: what
        the token view sets a reply's own log-probabilities against. Raises as `prepare` does, and
        AdapterLoadError when an adapter cannot be put on the device."""
        if not reply_tokens:
            return ()
        prepared = self.prepare(ChatRequest(adapter, tuple(messages), SamplingParams(max_new_tokens=1)))
        ids = torch.tensor([prepared.prompt + list(reply_tokens)], device=self.base.device)
        with self.lock, torch.no_grad():  # between two decode steps: the loop routes its own rows again
            failed = self.make_resident(list(prepared.entries))
            if failed:
                raise next(iter(failed.values()))
            logits = self.route([prepared.row_key])(input_ids=ids).logits[0]  # [prompt + reply, vocab]
        start = len(prepared.prompt) - 1  # position i predicts token i + 1
        return _token_logprobs(logits[start : start + len(reply_tokens)], list(reply_tokens), top)

    # -- generation ----------------------------------------------------------------------
    def loop(self) -> ContinuousBatcher:
        """The engine's decode loop, started on first use."""
        with self._loop_lock:
            if self._loop is None:
                from serve.batcher import ContinuousBatcher  # the loop drives this engine: imported late

                self._loop = ContinuousBatcher(self, max_batch=self.limits.max_batch, decode=self.decode)
            return self._loop

    def submit(self, request: ChatRequest | Prepared) -> Stream:
        """Queue one request on the decode loop; a request that fails preparation gets a finished stream."""
        return self.loop().submit(request)

    def generate(self, requests: Sequence[ChatRequest], timeout: float | None = None) -> list[ChatResult]:
        """One result per request, in order, all submitted together (they share decode steps);
        a bad request gets an error result, the others run."""
        streams = [self.submit(r) for r in requests]
        return [s.wait(timeout) for s in streams]

    def close(self) -> None:
        """Stop the decode loop, finishing what it holds."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()
