"""The serving engine: one 4-bit base, adapters loaded into one peft model by key, and every
request routed to its own adapter per row (`serve/routing.py`), never by a shared `set_adapter`.

Only this module touches peft adapter state. Deciding which adapters stay resident (the LRU in
`AdapterCache`) is kept apart from loading and unloading them (`Engine._load` / `_unload`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from adapters.base import LoadedBase
from adapters.chat import Message, encode_prompt, left_pad
from adapters.store import CHAT_TEMPLATE_FILE
from serve.registry import AdapterEntry, AdapterRegistry, UnknownAdapterError
from serve.routing import LoraRouter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 decodes greedily."""
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """The reply ends before the first of these strings."""

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens <= 0:
            raise ValueError(f"invalid sampling parameters: {self}")

    @property
    def batch_key(self) -> tuple:
        """Requests whose key is equal can share one generate call."""
        return (self.temperature, self.top_p, self.top_k, self.seed)


@dataclass(frozen=True)
class ServeLimits:
    max_new_tokens: int = 256
    """Server-side cap: larger requests are capped, not refused."""
    max_batch: int = 32


@dataclass(frozen=True)
class ChatRequest:
    adapter: str
    """An adapter name, or 'base' for the base alone."""
    messages: tuple[Message, ...]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class ChatResult:
    adapter: str
    text: str = ""
    new_tokens: int = 0
    error: str | None = None
    prompt_tokens: int = 0
    finish_reason: str = "stop"
    """'length' when the reply hit its token limit, 'stop' otherwise (EOS, a stop string, cancelled)."""


@torch.no_grad()
def warm_up(base: LoadedBase) -> None:
    """One tiny forward before serving: bitsandbytes repacks 4-bit weights for its CPU kernel on
    the first call, which computes slightly differently from every later call; without this the
    first request could get different greedy tokens from an identical second one."""
    ids = torch.tensor([[base.tokenizer.pad_token_id] * 2], device=base.device)
    base.model(input_ids=ids)


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

    def evictions(self, pinned: set[str]) -> list[str]:
        """Keys to unload to get back within capacity, oldest first, never a pinned one."""
        over = len(self._keys) - self.capacity
        victims = [k for k in self._keys if k not in pinned][: max(0, over)]
        for key in victims:
            del self._keys[key]
        return victims


class Engine:
    """Generates replies for batches of requests that each name their own adapter."""

    def __init__(self, base: LoadedBase, registry: AdapterRegistry, max_loaded: int = 8, limits: ServeLimits = ServeLimits(),
                 lora_kernel: str = "auto"):
        LoraRouter.check_kernel(lora_kernel, base.device)  # a bad choice fails here, not at the first adapter request
        self.base, self.registry, self.limits = base, registry, limits
        self.lora_kernel = lora_kernel
        """Which fused kernel adds the routed LoRA delta where it applies (`serve.routing.KERNELS`)."""
        self.cache = AdapterCache(max_loaded)
        self._model: PeftModel | None = None
        self._router: LoraRouter | None = None
        self._host: dict[str, tuple[PeftConfig, dict]] = {}
        """Evicted adapters' weights kept in host memory: reloading them reads no file."""
        self._lock = threading.Lock()
        self._templates: dict[str, str | None] = {}
        self._names: dict[str, str] = {}
        """Adapter key -> adapter name (keys escape '.', so a name is not recoverable from its key)."""
        self.loads_from_disk = 0
        self.decode_threads: int | None = None
        """Intra-op threads the decode loop chose for this engine (serve/batcher.py)."""
        warm_up(base)

    # -- adapter residency -------------------------------------------------------------
    def _load(self, entry: AdapterEntry) -> None:
        if entry.key in self._host:
            config, weights = self._host.pop(entry.key)
            self._model.add_adapter(entry.key, config)
            set_peft_model_state_dict(self._model, weights, adapter_name=entry.key)
            return
        self.loads_from_disk += 1
        try:
            if self._model is None:
                self._model = PeftModel.from_pretrained(self.base.model, str(entry.path), adapter_name=entry.key)
            else:
                self._model.load_adapter(str(entry.path), adapter_name=entry.key)
        except Exception as err:
            raise RuntimeError(f"loading adapter {entry.name!r} from {entry.path} failed: {err}") from err
        self._model.eval()

    def _unload(self, key: str) -> None:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(self._model, adapter_name=key).items()}
        self._host[key] = (self._model.peft_config[key], weights)
        self._model.delete_adapter(key)

    def _make_resident(self, entries: list[AdapterEntry]) -> None:
        """Load what the batch needs, evict the least recently used beyond the cap, and restack
        the routed weights when the resident set changed."""
        needed = {e.key: e for e in entries}
        changed = False
        for key, entry in needed.items():
            if not self.cache.touch(key):
                self._load(entry)
                self._names[key] = entry.name
                changed = True
        for key in self.cache.evictions(pinned=set(needed)):
            self._unload(key)
            changed = True
        if self._model is not None and (changed or self._router is None):
            self._router = self._router or LoraRouter(self._model, self.base.compute_dtype, kernel=self.lora_kernel)
            self._router.rebuild(self.cache.resident())

    def route(self, keys: list[str | None], replayed: bool = False) -> torch.nn.Module:
        """The model to run for rows that use these adapter keys (None: the base alone).
        replayed: the step is captured as a CUDA graph, or is the run before its capture (`LoraRouter.set_rows`)."""
        if self._model is None:
            return self.base.model
        self._router.set_rows(keys, replayed)
        return self._model

    def resident(self) -> list[str]:
        return self.cache.resident()

    def resident_names(self) -> set[str]:
        """Names of the adapters whose weights are on the device now."""
        return {self._names[key] for key in self.cache.resident()}

    def evict(self, name: str) -> bool:
        """Move an adapter's weights off the device (kept in host memory); True when it was resident.

        A request still running on it is unaffected: its next step makes it resident again.
        """
        with self._lock:
            keys = [k for k in self.cache.resident() if self._names[k] == name]
            for key in keys:
                self.cache.remove(key)
                self._unload(key)
            if keys and self._router is not None:
                self._router.rebuild(self.cache.resident())
        return bool(keys)

    # -- generation ----------------------------------------------------------------------
    def _template(self, entry: AdapterEntry | None) -> str | None:
        """The adapter's saved chat template, read once per version; None means the base's own."""
        if entry is None:
            return None
        if entry.key not in self._templates:
            file = entry.path / CHAT_TEMPLATE_FILE
            self._templates[entry.key] = file.read_text() if file.is_file() else None
        return self._templates[entry.key]

    def _prepare(self, request: ChatRequest) -> tuple[AdapterEntry | None, list[int], int]:
        entry = self.registry.resolve(request.adapter)
        prompt = encode_prompt(self.base.tokenizer, request.messages, self._template(entry))
        # Capped, never refused: by the server's limit and by the room the context leaves.
        max_new = min(request.params.max_new_tokens, self.limits.max_new_tokens)
        context = getattr(self.base.model.config, "max_position_embeddings", None)
        if context:
            if len(prompt) >= context:
                raise ValueError(f"prompt is {len(prompt)} tokens, which fills the model's context of {context} tokens")
            max_new = min(max_new, context - len(prompt))
        return entry, prompt, max_new

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """One result per request, in order; a bad request gets an error result, the others run."""
        results: list[ChatResult | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, AdapterEntry | None, list[int], int]]] = {}
        for i, request in enumerate(requests):
            try:
                entry, prompt, max_new = self._prepare(request)
            except (UnknownAdapterError, ValueError) as err:
                results[i] = ChatResult(request.adapter, error=str(err))
                continue
            groups.setdefault(request.params.batch_key, []).append((i, entry, prompt, max_new))
        for rows in groups.values():
            for start in range(0, len(rows), self.limits.max_batch):
                chunk = rows[start : start + self.limits.max_batch]
                try:
                    replies = self._run_batch(chunk, requests[chunk[0][0]].params)
                except Exception as err:  # the batch failed as a whole: each of its requests says why
                    log.exception("batch failed")
                    replies = [ChatResult(requests[i].adapter, error=str(err)) for i, *_ in chunk]
                for (i, *_), reply in zip(chunk, replies):
                    results[i] = reply
        return results

    def _run_batch(self, rows, params: SamplingParams) -> list[ChatResult]:
        tokenizer = self.base.tokenizer
        ids, mask = left_pad([prompt for _, _, prompt, _ in rows], tokenizer.pad_token_id)
        width = ids.shape[1]
        keys = [entry.key if entry else None for _, entry, _, _ in rows]
        with self._lock:
            self._make_resident([entry for _, entry, _, _ in rows if entry is not None])
            output = self._generate(ids, mask, self.route(keys), max(m for *_, m in rows), params)
        return [self._finish(rows[r], output[r, width:], params) for r in range(len(rows))]

    @torch.no_grad()
    def _generate(self, ids, mask, model, max_new: int, params: SamplingParams) -> torch.Tensor:
        sampling = params.temperature > 0
        kwargs = {"do_sample": sampling}
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        return model.generate(
            input_ids=ids.to(self.base.device), attention_mask=mask.to(self.base.device), max_new_tokens=max_new,
            pad_token_id=self.base.tokenizer.pad_token_id, eos_token_id=self.base.tokenizer.eos_token_id, **kwargs,
        ).cpu()

    def _finish(self, row, new_ids: torch.Tensor, params: SamplingParams) -> ChatResult:
        i, entry, _, max_new = row
        tokens = new_ids[:max_new].tolist()
        eos = self.base.tokenizer.eos_token_id
        if eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        text = self.base.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        cut = cut_at_stop(text, params.stop)
        if cut is not None:
            text = cut.strip()
        return ChatResult(entry.name if entry else "base", text, len(tokens))
