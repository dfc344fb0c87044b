"""Iteration-level batching: one decode loop for all running requests, whatever their adapter.

Every step the loop (1) admits waiting requests: their prompts are prefilled as one mixed
batch and their KV caches joined to the running batch, and (2) decodes one token for every
running request, each row through its own adapter (`serve/routing.py`). A request that arrives
while others generate joins at the next step instead of waiting for the longest one to end;
a finished request leaves the batch at once. Tokens stream to each caller as they come.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from adapters.chat import left_pad
from serve.engine import ChatRequest, ChatResult, Engine, SamplingParams, cut_at_stop
from serve.registry import AdapterEntry, UnknownAdapterError
from serve.slots import DEFAULT_SLOTS_SHARE, DecodeSettings, SlotCache, StepGraphs, causal_lm, device_free_bytes

log = logging.getLogger(__name__)
_DONE = object()


class Stream:
    """What a caller holds: iterate for text pieces as they are generated, or wait for the result."""

    def __init__(self) -> None:
        self._pieces: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._callbacks: list = []
        self._lock = threading.Lock()
        self.cancelled = threading.Event()
        self.result: ChatResult | None = None

    def cancel(self) -> None:
        """Ask the decode loop to end this request at its next step, with the text so far."""
        self.cancelled.set()

    def add_done_callback(self, fn) -> None:
        """Call fn(result) once the request ends (at once if it already has)."""
        with self._lock:
            if self.result is None:
                self._callbacks.append(fn)
                return
        fn(self.result)

    def __iter__(self):
        while (piece := self._pieces.get()) is not _DONE:
            yield piece

    def wait(self, timeout: float | None = None) -> ChatResult:
        if not self._done.wait(timeout):
            raise TimeoutError("request did not finish in time")
        return self.result

    def _emit(self, piece: str) -> None:
        if piece:
            self._pieces.put(piece)

    def _finish(self, result: ChatResult) -> None:
        with self._lock:
            self.result = result
            callbacks, self._callbacks = self._callbacks, []
        self._pieces.put(_DONE)
        self._done.set()
        for fn in callbacks:
            try:
                fn(result)
            except Exception:  # a caller's hook must not break the decode loop
                log.exception("done callback failed")


@dataclass
class Running:
    request: ChatRequest
    entry: AdapterEntry | None
    prompt: list[int]
    max_new: int
    stream: Stream
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""

    @property
    def adapter_key(self) -> str | None:
        return self.entry.key if self.entry else None


class ContinuousBatcher:
    def __init__(self, engine: Engine, max_batch: int = 32, gather_s: float = 0.003, threads: int | None = None,
                 decode: DecodeSettings = DecodeSettings()):
        """threads: intra-op threads for the decode loop's CPU work; None measures (see _choose_threads).
        decode: the KV cache the loop keeps; the static one can replay captured steps (serve/slots.py)."""
        self.engine, self.max_batch, self.gather_s = engine, max_batch, gather_s
        self.threads = threads
        self._slots: SlotCache | None = None
        self.graphs: StepGraphs | None = None
        self.graph_error: str | None = None
        """Why the loop stopped capturing steps, if it had to."""
        if self._keeps_slots(decode):
            self._slots, self.graphs = self._static_cache(decode)
        log.info("decode loop: %s", self._describe_cache())
        self._default_threads = torch.get_num_threads()  # read here: a new thread may report another count
        self._waiting: queue.Queue = queue.Queue()
        self._running: list[Running] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [batch, cached_len]: 0 where a row is left-padded
        self._pending: tuple[DynamicCache, torch.Tensor] | None = None  # prefilled, not yet joined
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self._thread.start()

    def _static_cache(self, decode: DecodeSettings) -> tuple[SlotCache, StepGraphs | None]:
        base = self.engine.base
        attention = getattr(base.model.config, "_attn_implementation", None)
        if attention != "sdpa":  # the slots pass a boolean 4-D mask, which only SDPA reads as such
            raise ValueError(f"the static decode cache needs sdpa attention, not {attention!r}")
        slots = SlotCache.for_model(base.model, self.max_batch, self._slot_context(decode), self._kv_dtype(), base.device)
        graphs = StepGraphs() if decode.replays_steps(base.device) else None
        return slots, graphs

    def _slot_context(self, decode: DecodeSettings) -> int:
        # no column past the model's own context: the engine never lets a request reach it
        return min(decode.context, getattr(self.engine.base.model.config, "max_position_embeddings", None) or decode.context)

    def _kv_dtype(self) -> torch.dtype:
        return self.engine.base.model.get_input_embeddings().weight.dtype

    def _keeps_slots(self, decode: DecodeSettings) -> bool:
        """Asked for, the slots; by default, where they apply and leave the device room
        (DEFAULT_SLOTS_SHARE of its free memory)."""
        base = self.engine.base
        if not decode.uses_static_cache(base.device, getattr(base.model.config, "_attn_implementation", None)):
            return False
        if decode.static_cache:
            return True
        context = self._slot_context(decode)
        need = SlotCache.bytes_for(base.model, self.max_batch, context, self._kv_dtype())
        free = device_free_bytes(base.device)
        if need <= DEFAULT_SLOTS_SHARE * free:
            return True
        log.warning("decode loop: static slots for %d requests of %d tokens would take %.1f GB of the %.1f GB free; "
                    "keeping the growing KV cache (a smaller --graph-context fits more; --cuda-graphs insists)",
                    self.max_batch, context, need / 1e9, free / 1e9)
        return False

    def _describe_cache(self) -> str:
        if self._slots is None:
            return "growing KV cache"
        replayed = ", steps replayed as CUDA graphs" if self.graphs is not None else ""
        return f"static slots of {self._slots.context} tokens{replayed}"

    def submit(self, request: ChatRequest) -> Stream:
        stream = Stream()
        self._waiting.put((request, stream))
        return stream

    def generate(self, request: ChatRequest, timeout: float | None = None) -> ChatResult:
        return self.submit(request).wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._waiting.put(None)
        self._thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------
    def _choose_threads(self) -> None:
        """Set this thread's intra-op threads: as configured, or on the CPU the faster of 1 and
        torch's default, timed on a small decode step.

        Outside the main thread, torch's OpenMP threads cost a fixed synchronisation per operator:
        on the 2-core CI machine a demo-base decode step took 17 ms with 2 threads and 6.5 ms with
        1. A large model's operators amortise it, and there the default wins. On a GPU the CPU
        threads only launch kernels, so nothing is changed.
        """
        self.threads = self.threads or self.engine.decode_threads  # measured once per engine
        if self.threads is not None:
            torch.set_num_threads(self.threads)
            return
        if self.engine.base.device.type != "cpu" or self._default_threads == 1:
            torch.set_num_threads(self._default_threads)
            return
        timings = {}
        for n in (self._default_threads, 1):
            torch.set_num_threads(n)
            timings[n] = self._time_decode_step()
        self.threads = self.engine.decode_threads = min(timings, key=timings.get)
        torch.set_num_threads(self.threads)
        log.info("decode loop: %d intra-op thread(s) (step %s ms)", self.threads,
                 {n: round(t * 1000, 2) for n, t in timings.items()})

    @torch.no_grad()
    def _time_decode_step(self, batch: int = 4, context: int = 16, repeats: int = 3) -> float:
        """Seconds for one base-only decode step of `batch` rows, the best of a few."""
        model, device = self.engine.route([None] * batch), self.engine.base.device
        ids = torch.full((batch, context), self.engine.base.tokenizer.pad_token_id, device=device)
        cache = DynamicCache()
        model(input_ids=ids, use_cache=True, past_key_values=cache, logits_to_keep=1)
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms this thread's kernels
            start = time.perf_counter()
            model(input_ids=ids[:, :1], use_cache=True, past_key_values=cache, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
            cache.crop(-1)
        return best

    def wait_ready(self, timeout: float | None = 60) -> None:
        """Block until the loop has chosen its threads and takes requests (they queue before that)."""
        self._ready.wait(timeout)

    def _loop(self) -> None:
        with self.engine._lock:  # the engine's model is only ever run under its lock
            self._choose_threads()
        self._ready.set()
        while not self._stop.is_set():
            admitted: list[Running] = []
            try:
                admitted = self._admit(block=not self._running)
                if self._running or admitted:
                    self._step(admitted)
            except Exception as err:  # fail the requests of this step, keep the loop (and server) alive
                log.exception("decode step failed")
                failed = {id(s): s for s in self._running + admitted}
                for seq in failed.values():
                    seq.stream._finish(ChatResult(seq.request.adapter, seq.text, len(seq.tokens), error=str(err)))
                self._running, self._cache, self._mask, self._pending = [], None, None, None
                if self._slots is not None:
                    self._slots.rows = 0

    def _admit(self, block: bool) -> list[Running]:
        """Take waiting requests (blocking only when idle); invalid ones are answered at once."""
        new: list[Running] = []
        while len(self._running) + len(new) < self.max_batch:
            try:
                if block and not new:
                    item = self._waiting.get()  # idle: sleep until a request comes
                elif block:
                    item = self._waiting.get(timeout=self.gather_s)  # others may be arriving with it
                else:
                    item = self._waiting.get_nowait()
            except queue.Empty:
                break
            if item is None:
                break
            request, stream = item
            try:
                entry, prompt, max_new = self.engine._prepare(request)
                max_new = self._fit_slot(prompt, max_new)
            except (UnknownAdapterError, ValueError) as err:
                stream._finish(ChatResult(request.adapter, error=str(err)))
                continue
            generator = torch.Generator().manual_seed(request.params.seed) if request.params.seed is not None else None
            new.append(Running(request, entry, prompt, max_new, stream, generator))
        return new

    def _fit_slot(self, prompt: list[int], max_new: int) -> int:
        """With the static cache, a reply capped so that prompt and reply fit one row slot."""
        if self._slots is None:
            return max_new
        room = self._slots.context - len(prompt)
        if room <= 0:
            raise ValueError(f"prompt is {len(prompt)} tokens, which fills the static decode cache's context of "
                             f"{self._slots.context} tokens (the server's --graph-context, DecodeSettings.context)")
        return min(max_new, room)

    def _step(self, admitted: list[Running]) -> None:
        with self.engine._lock:
            pinned = [s.entry for s in self._running + admitted if s.entry is not None]
            self.engine._make_resident(pinned)
            if admitted:
                prefill_logits = self._prefill(admitted)
            decode_logits = self._decode() if self._running else None
        # Rows of the running batch first, then the admitted ones, as in the cache.
        logits = [t for t in (decode_logits, prefill_logits if admitted else None) if t is not None]
        if admitted:
            self._join(admitted)
        self.steps += 1
        self._advance(torch.cat(logits))

    def _forward(self, ids, mask, positions, rows: list[Running], cache: DynamicCache):
        model = self.engine.route([r.adapter_key for r in rows])
        device = self.engine.base.device
        with torch.no_grad():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                        past_key_values=cache, use_cache=True, logits_to_keep=1)  # only the last position is sampled
        return out.logits[:, -1]  # [batch, vocab], on the device

    def _prefill(self, rows: list[Running]) -> torch.Tensor:
        ids, mask = left_pad([r.prompt for r in rows], self.engine.base.tokenizer.pad_token_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, rows, cache)
        self._pending = (cache, mask)
        return logits

    def _decode(self) -> torch.Tensor:
        if self._slots is not None:
            return self._decode_slots()
        last = torch.tensor([[s.tokens[-1]] for s in self._running])
        positions = self._mask.sum(-1, keepdim=True)  # each row's next position: its real tokens so far
        self._mask = torch.cat([self._mask, torch.ones(len(self._running), 1, dtype=self._mask.dtype)], dim=1)
        return self._forward(last, self._mask, positions, self._running, self._cache)

    def _decode_slots(self) -> torch.Tensor:
        """One step on the static slots: captured and replayed on a GPU, eager elsewhere. The step
        runs on a power-of-two bucket of rows; the rows past the running ones repeat the first
        row's adapter, so a batch on one adapter keeps that adapter's own path."""
        slots, n = self._slots, len(self._running)
        rows = slots.bucket(n)
        keys = [r.adapter_key for r in self._running]
        router = self.engine._router
        if self.graphs is not None and router is not None:
            router.fix_masks(slots.capacity)  # a replayed step reads its rows' masks where it saw them
        model = causal_lm(self.engine.route(keys + keys[:1] * (rows - n), replayed=self.graphs is not None))
        slots.set_tokens([s.tokens[-1] for s in self._running])
        if self.graphs is None:
            return slots.step(model, rows)[:n]
        signature, version = (router.signature(), (id(router), router.version)) if router else (("plain",), None)
        try:
            return self.graphs.run(slots, model, rows, signature, version)[:n]
        except RuntimeError as err:  # a capture this stack refuses: the same steps, eagerly, from now on
            log.exception("capturing a decode step failed; decoding without CUDA graphs")
            self.graphs, self.graph_error = None, f"{type(err).__name__}: {err}"
            return slots.step(model, rows)[:n]

    def _join(self, admitted: list[Running]) -> None:
        """Append the prefilled rows' caches to the running batch, left-padding the shorter side."""
        cache, mask = self._pending
        self._pending = None
        if self._slots is not None:
            self._slots.join(cache, mask)
            self._running = self._running + list(admitted)
            return
        if self._cache is None:
            self._cache, self._mask, self._running = cache, mask, list(admitted)
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        layers = []
        for old, new in zip(self._cache.layers, cache.layers):
            keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)])
        self._running = self._running + list(admitted)

    def _advance(self, logits: torch.Tensor) -> None:
        """Pick each row's next token, stream it, and drop the rows that finished."""
        keep = []
        for i, (seq, token) in enumerate(zip(self._running, self._pick_tokens(logits))):
            if self._append(seq, token):
                keep.append(i)
        if len(keep) < len(self._running):
            self._running = [self._running[i] for i in keep]
            if self._slots is not None:
                self._slots.keep(keep)
                return
            if not keep:
                self._cache, self._mask = None, None
                return
            index = torch.tensor(keep)
            self._cache.batch_select_indices(index.to(self._cache.layers[0].keys.device))
            self._mask = self._mask[index]
            self._trim_padding()

    def _pick_tokens(self, logits: torch.Tensor) -> list[int]:
        """Each running row's next token from its [vocab] logits.

        When every row decodes greedily the argmax runs where the logits are and only the ids
        cross to the host: on a GPU with a 128k vocabulary that saves copying 8 MB per step for
        16 rows and 16 host-side argmaxes. Sampling rows need their probabilities on the host,
        where each request's own generator lives.
        """
        params = [seq.request.params for seq in self._running]
        if all(p.temperature == 0 for p in params):
            return logits.argmax(dim=-1).tolist()
        host = logits.float().cpu()
        return [_pick(row, p, seq.generator) for row, p, seq in zip(host, params, self._running)]

    def _append(self, seq: Running, token: int) -> bool:
        """Record a token and stream the new text; True while the request goes on."""
        tokenizer = self.engine.base.tokenizer
        finished = token == tokenizer.eos_token_id
        if not finished:
            seq.tokens.append(token)
        text = tokenizer.decode(seq.tokens, skip_special_tokens=True).lstrip()
        cut = cut_at_stop(text, seq.request.params.stop)
        final = finished or cut is not None or len(seq.tokens) >= seq.max_new or seq.stream.cancelled.is_set()
        shown = cut if cut is not None else text
        if final or not shown.endswith("\ufffd"):  # hold back half a multi-byte character
            seq.stream._emit(shown[len(seq.text) :])
            seq.text = shown
        if final:
            name = seq.entry.name if seq.entry else "base"
            reason = "length" if len(seq.tokens) >= seq.max_new and not finished and cut is None else "stop"
            seq.stream._finish(ChatResult(name, seq.text.strip(), len(seq.tokens), prompt_tokens=len(seq.prompt), finish_reason=reason))
        return not final

    def _trim_padding(self) -> None:
        """Drop cache columns that are padding in every remaining row."""
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self._mask.shape[1]
        if first == 0:
            return
        self._mask = self._mask[:, first:]
        self._cache = DynamicCache(ddp_cache_data=[(l.keys[:, :, first:], l.values[:, :, first:]) for l in self._cache.layers])


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, heads, len, dim] -> [batch, heads, width, dim], zeros in front."""
    missing = width - t.shape[2]
    return t if missing == 0 else torch.nn.functional.pad(t, (0, 0, missing, 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.nn.functional.pad(mask, (missing, 0))


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else temperature, top-k and top-p sampling with the request's own generator."""
    if params.temperature == 0:
        return int(logits.argmax())
    scores = logits / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
