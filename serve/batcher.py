"""Iteration-level batching: one decode loop for all running requests, whatever their adapter.

Every step the loop (1) admits waiting requests: their prompts are prefilled as one mixed
batch and their KV caches joined to the running batch, and (2) decodes one token for every
running request, each row through its own adapter (`serve/routing.py`). A request that arrives
while others generate joins at the next step instead of waiting for the longest one to end;
a finished request leaves the batch at once. Tokens stream to each caller as they come.

One request's fault stays its own: whatever fails while admitting, loading its adapter or
sampling its token ends that request alone, with a typed error, and its neighbours go on.

With `DecodeSettings(deterministic=True)` a request's tokens do not depend on what else the
server runs: each prompt is prefilled alone, every decode step runs the full width of the static
slots (so every matrix product has the same shape whatever the load), each row's LoRA delta is
computed from that row alone (`LoraRouter(per_row=True)`) and the loop keeps one thread count.
docs/architecture.md#deterministic-mode
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
from serve.engine import (AdapterLoadError, ChatRequest, ChatResult, ContextLengthError, Engine, Prepared, SamplingParams,
                          TokenLogprob)
from serve.grammar import Constraint, GrammarError
from serve.registry import AdapterEntry, UnknownAdapterError
from serve.routing import RowKey
from serve.slots import DEFAULT_SLOTS_SHARE, DecodeSettings, SlotCache, StepGraphs, causal_lm, device_free_bytes

log = logging.getLogger(__name__)
_DONE = object()


@dataclass(frozen=True)
class Piece:
    """What one step hands a caller: the reply's new text, and its tokens' log-probabilities when
    the request asked for them (a step whose text is held back passes its tokens on with the next)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


class Stream:
    """What a caller holds: iterate for text pieces as they are generated (`pieces()` for their
    log-probabilities too), or wait for the result."""

    def __init__(self) -> None:
        self._pieces: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._callbacks: list = []
        self._lock = threading.Lock()
        self.cancelled = threading.Event()
        self.result: ChatResult | None = None
        # Monotonic times for the latency metrics (serve/metrics.py): queued, joined the running
        # batch, and each token's text handed over (a token that ends half a character waits for the next).
        self.queued_at = time.monotonic()
        self.admitted_at: float | None = None
        self.token_times: list[float] = []

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
        return (piece.text for piece in self.pieces() if piece.text)

    def pieces(self):
        """Each step's `Piece` until the request ends."""
        while (piece := self._pieces.get()) is not _DONE:
            yield piece

    def wait(self, timeout: float | None = None) -> ChatResult:
        if not self._done.wait(timeout):
            raise TimeoutError("request did not finish in time")
        return self.result

    def _emit(self, text: str, logprobs: tuple[TokenLogprob, ...] = ()) -> None:
        self.token_times.append(time.monotonic())
        if text or logprobs:
            self._pieces.put(Piece(text, logprobs))

    def _finish(self, result: ChatResult) -> None:
        """End the request with `result`; only the first call counts."""
        with self._lock:
            if self.result is not None:
                return
            self.result = result
            callbacks, self._callbacks = self._callbacks, []
        self._pieces.put(_DONE)
        self._done.set()
        for fn in callbacks:
            try:
                fn(result)
            except Exception:  # a caller's hook must not break the decode loop
                log.exception("done callback failed")


SHUTDOWN = "the server is shutting down"


@dataclass
class Running:
    prepared: Prepared
    stream: Stream
    generator: torch.Generator | None
    max_new: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    checked: int = 0
    """How much of `text` is known to hold no stop string."""
    constraint: Constraint | None = None
    """The request's `response_format` grammar, advanced token by token."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """With `SamplingParams.logprobs`: one per token in `tokens`."""
    picked: TokenLogprob | None = None
    """The log-probabilities of the token just picked, kept once `_append` keeps the token."""
    sent: int = 0
    """How many of `logprobs` the stream has handed over."""

    def __post_init__(self) -> None:
        self.stream.admitted_at = time.monotonic()  # admitted: it runs from the next step on

    @property
    def request(self) -> ChatRequest:
        return self.prepared.request

    @property
    def entry(self) -> AdapterEntry | None:
        return self.prepared.entry

    @property
    def prompt(self) -> list[int]:
        return self.prepared.prompt

    @property
    def adapter_key(self) -> RowKey:
        """The router's key for this row: an adapter key, a mix's (key, scale) pairs, or None (the base)."""
        return self.prepared.row_key

    @property
    def name(self) -> str:
        return self.prepared.adapter_name

    def load_failure(self, failed: dict[str, AdapterLoadError]) -> AdapterLoadError | None:
        """The load error of one of this row's adapters, if one of them failed to load."""
        return next((failed[e.key] for e in self.prepared.entries if e.key in failed), None)

    def fail(self, err: BaseException) -> None:
        self.stream._finish(ChatResult.failed(self.request.adapter, err, self.text, len(self.tokens)))


def request_generator(params: SamplingParams) -> torch.Generator | None:
    """A sampled request's own generator: seeded, its draws repeat; unseeded, fresh entropy. Never
    the global one, so no request's samples depend on another's."""
    if params.temperature == 0:
        return None
    generator = torch.Generator()
    if params.seed is not None:
        return generator.manual_seed(params.seed)
    generator.seed()
    return generator


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the first stop string begins in `text`, looking only at matches that end past `start`
    (the text before it was checked already); None when there is none."""
    hits = [at for s in stops if s and (at := text.find(s, max(0, start - len(s) + 1))) >= 0]
    return min(hits) if hits else None


class ContinuousBatcher:
    def __init__(self, engine: Engine, max_batch: int = 32, gather_s: float = 0.003, threads: int | None = None,
                 decode: DecodeSettings = DecodeSettings()):
        """threads: intra-op threads for the decode loop's CPU work; None measures (see _choose_threads),
        except in the deterministic mode, which keeps one.
        decode: the KV cache the loop keeps; the static one can replay captured steps (serve/slots.py)."""
        self.engine, self.max_batch, self.gather_s = engine, max_batch, gather_s
        self.deterministic = decode.deterministic
        self.threads = threads if threads is not None or not decode.deterministic else DETERMINISTIC_THREADS
        self.stop_ids = engine.base.stop_token_ids
        """The tokens that end a reply (`LoadedBase.stop_token_ids`)."""
        self.kv: GrowingKV | StaticKV = self._static_cache(decode) if self._keeps_slots(decode) else GrowingKV()
        """The running requests' KV cache; both kinds offer the same few methods."""
        log.info("decode loop: %s", self.kv.describe())
        self._default_threads = torch.get_num_threads()  # read here: a new thread may report another count
        self._waiting: queue.Queue = queue.Queue()
        self._running: list[Running] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="decode-loop", daemon=True)
        self._thread.start()

    def _static_cache(self, decode: DecodeSettings) -> StaticKV:
        base = self.engine.base
        attention = getattr(base.model.config, "_attn_implementation", None)
        if attention != "sdpa":  # the slots pass a boolean 4-D mask, which only SDPA reads as such
            raise ValueError(f"the static decode cache needs sdpa attention, not {attention!r}")
        slots = SlotCache.for_model(base.model, self.max_batch, self._slot_context(decode), self._kv_dtype(), base.device)
        graphs = StepGraphs() if decode.replays_steps(base.device) else None
        return StaticKV(slots, graphs, full_width=decode.deterministic)

    def _slot_context(self, decode: DecodeSettings) -> int:
        # no column past the model's own context: the engine never lets a request reach it
        return min(decode.context, getattr(self.engine.base.model.config, "max_position_embeddings", None) or decode.context)

    def _kv_dtype(self) -> torch.dtype:
        return self.engine.base.model.get_input_embeddings().weight.dtype

    def _keeps_slots(self, decode: DecodeSettings) -> bool:
        """Asked for (or deterministic), the slots; by default, where they apply and leave the
        device room (DEFAULT_SLOTS_SHARE of its free memory)."""
        base = self.engine.base
        if not decode.uses_static_cache(base.device, getattr(base.model.config, "_attn_implementation", None)):
            return False
        if decode.static_cache or decode.deterministic:
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

    def submit(self, request: ChatRequest | Prepared) -> Stream:
        """Queue a request. A ChatRequest is prepared here, in the caller's thread (never on the
        decode loop's); one that cannot be prepared gets a stream that has already ended with why."""
        stream = Stream()
        if isinstance(request, ChatRequest):
            try:
                request = self.engine.prepare(request)
            except (UnknownAdapterError, ValueError) as err:
                stream._finish(ChatResult.failed(request.adapter, err))
                return stream
        if self._stop.is_set():
            stream._finish(ChatResult(request.request.adapter, error=SHUTDOWN, error_code="server_error"))
            return stream
        self.engine.prefetch(request.entries)  # read here, while the loop runs its step, not under its lock
        self._waiting.put((request, stream))
        return stream

    def generate(self, request: ChatRequest, timeout: float | None = None) -> ChatResult:
        return self.submit(request).wait(timeout)

    def close(self) -> None:
        """Stop the loop; every request it still holds, waiting or running, ends with an error."""
        self._stop.set()
        self._waiting.put(None)
        self._thread.join(timeout=30)
        for seq in self._running:
            seq.stream._finish(ChatResult(seq.request.adapter, seq.text, len(seq.tokens), error=SHUTDOWN,
                                          error_code="server_error"))
        self._running = []
        while True:
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                prepared, stream = item
                stream._finish(ChatResult(prepared.request.adapter, error=SHUTDOWN, error_code="server_error"))

    # -- the loop ----------------------------------------------------------------------
    def _choose_threads(self) -> None:
        """Set this thread's intra-op threads: as configured, or on the CPU the faster of 1 and
        torch's default, timed on a small decode step.

        Outside the main thread, torch's OpenMP threads cost a fixed synchronisation per operator,
        which a small model's operators do not amortise; a large model's do, and there the default
        wins (docs/performance.md#threads). On a GPU the CPU threads only launch kernels, so
        nothing is changed.
        """
        self.threads = self.threads or self.engine.decode_threads  # measured once per engine
        if self.threads is not None:
            torch.set_num_threads(self.threads)
            return
        if self.engine.base.device.type != "cpu" or self._default_threads == 1:
            self.threads = self.engine.decode_threads = self._default_threads  # nothing to choose between
            torch.set_num_threads(self.threads)
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

    def is_alive(self) -> bool:
        """The loop runs and takes requests (False once closed, or if its thread died)."""
        return self._thread.is_alive() and not self._stop.is_set()

    def wait_ready(self, timeout: float | None = 60) -> None:
        """Block until the loop has chosen its threads and takes requests (they queue before that)."""
        self._ready.wait(timeout)

    def _loop(self) -> None:
        with self.engine.lock:  # the engine's model is only ever run under its lock
            self._choose_threads()
        self._ready.set()
        while not self._stop.is_set():
            admitted: list[Running] = []
            try:
                admitted = self._admit(block=not self._running)
                self._drop_cancelled()
                if self._running or admitted:
                    self._step(admitted)
            except Exception as err:  # a fault of the loop itself: fail this step's requests, keep serving
                log.exception("decode step failed")
                for seq in {id(s): s for s in self._running + admitted}.values():
                    seq.fail(err)
                self._reset()

    def _reset(self) -> None:
        self._running = []
        self.kv.reset()

    def _admit(self, block: bool) -> list[Running]:
        """Take waiting requests (blocking only when idle); one that cannot run is answered at once."""
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
            prepared, stream = item
            if stream.cancelled.is_set():  # its caller left before it started: nothing to compute
                stream._finish(ChatResult(prepared.request.adapter, prompt_tokens=len(prepared.prompt)))
                continue
            try:
                max_new = self.kv.fit(prepared.prompt, prepared.max_new)
                constraint = (None if prepared.grammar is None else
                              self.engine.grammars.constraint(prepared.grammar, self.stop_ids | prepared.stop_ids))
                new.append(Running(prepared, stream, request_generator(prepared.request.params), max_new, constraint=constraint))
            except Exception as err:  # this request's alone: its neighbours are admitted as usual
                stream._finish(ChatResult.failed(prepared.request.adapter, err))
        return new

    def _drop_cancelled(self) -> None:
        """End the running requests whose callers cancelled (or left), with the text so far."""
        keep = [i for i, seq in enumerate(self._running) if not seq.stream.cancelled.is_set()]
        if len(keep) == len(self._running):
            return
        for seq in self._running:
            if seq.stream.cancelled.is_set():
                seq.stream._finish(ChatResult(seq.name, seq.text.strip(), len(seq.tokens), prompt_tokens=len(seq.prompt)))
        self._keep_rows(keep)

    def _step(self, admitted: list[Running]) -> None:
        with self.engine.lock:
            admitted = self._load_adapters(admitted)
            prefilled = [(rows, *self._prefill(rows)) for rows in self._prefill_groups(admitted)]
            decode_logits = self._decode() if self._running else None
        # Rows of the running batch first, then the admitted ones, as in the cache.
        logits = [t for t in [decode_logits, *[p[1] for p in prefilled]] if t is not None]
        for rows, _, cache, mask in prefilled:
            self._join(rows, cache, mask)
        self.steps += 1
        if logits:
            self._advance(torch.cat(logits))

    def _load_adapters(self, admitted: list[Running]) -> list[Running]:
        """Make this step's adapters resident. The requests of one that fails to load end with its
        error (running ones leave the batch); the rest of the step goes on. Returns the admitted
        requests that can run."""
        rows = self._running + admitted
        failed = self.engine.make_resident([e for s in rows for e in s.prepared.entries])
        if not failed:
            return admitted
        for seq in rows:
            err = seq.load_failure(failed)
            if err is not None:
                seq.fail(err)
        self._keep_rows([i for i, s in enumerate(self._running) if s.load_failure(failed) is None])
        return [s for s in admitted if s.load_failure(failed) is None]

    def _prefill_groups(self, admitted: list[Running]) -> list[list[Running]]:
        """Prompts prefilled together: all of them in one left-padded batch, or in the
        deterministic mode each alone (a batch's padding and shape would reach its numbers)."""
        if not admitted:
            return []
        return [[seq] for seq in admitted] if self.deterministic else [admitted]

    def _forward(self, ids, mask, positions, rows: list[Running], cache: DynamicCache):
        model = self.engine.route([r.adapter_key for r in rows])
        device = self.engine.base.device
        with torch.no_grad():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                        past_key_values=cache, use_cache=True, logits_to_keep=1)  # only the last position is sampled
        return out.logits[:, -1]  # [batch, vocab], on the device

    def _prefill(self, rows: list[Running]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        ids, mask = left_pad([r.prompt for r in rows], self.engine.base.tokenizer.pad_token_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        return self._forward(ids, mask, positions, rows, cache), cache, mask

    def _decode(self) -> torch.Tensor:
        return self.kv.decode(self.engine, self._running, self._forward)

    def _join(self, admitted: list[Running], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add the prefilled rows to the running batch, after the rows already running."""
        self.kv.join(cache, mask)
        self._running = self._running + list(admitted)

    def _advance(self, logits: torch.Tensor) -> None:
        """Pick each row's next token, stream it, and drop the rows that finished."""
        keep = []
        for i, (seq, token) in enumerate(zip(self._running, self._pick_tokens(logits))):
            if isinstance(token, Exception):
                seq.fail(token)
            elif self._append(seq, token):
                keep.append(i)
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep these running rows (ascending indices) and their KV cache; drop the rest."""
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        self.kv.keep(keep)

    def _pick_tokens(self, logits: torch.Tensor) -> list[int | Exception]:
        """Each running row's next token from its [vocab] logits, or the error that row hit.

        When every row decodes greedily, free and without log-probabilities, the argmax runs where
        the logits are and only the ids cross to the host (with a large vocabulary that saves
        copying every row's logits each step). Otherwise the rows' logits come to the host, where
        each request's own generator and grammar matcher live. A row whose logits are not finite
        fails alone.
        """
        params = [seq.request.params for seq in self._running]
        finite = torch.isfinite(logits).all(dim=-1)
        if all(p.temperature == 0 and p.logprobs is None for p in params) and not any(s.constraint for s in self._running):
            # one transfer for both: on a GPU each read back to the host waits for the step
            tokens, finite = torch.stack([logits.argmax(dim=-1), finite.long()]).tolist()
            return [t if ok else NonFiniteLogits() for t, ok in zip(tokens, finite)]
        host = logits.float().cpu()
        return [self._pick_row(row, seq) if ok else NonFiniteLogits()
                for row, seq, ok in zip(host, self._running, finite.tolist())]

    @staticmethod
    def _pick_row(logits: torch.Tensor, seq: Running) -> int | Exception:
        """One row's token: within its grammar where it has one; its log-probabilities noted in `seq.picked`."""
        params = seq.request.params
        scores = seq.constraint.restrict(logits) if seq.constraint else logits
        if not torch.isfinite(scores).any():
            return NoAllowedToken()
        token = _pick(scores, params, seq.generator)
        seq.picked = None if params.logprobs is None else token_logprob(logits, token, params.logprobs)
        return token

    def _append(self, seq: Running, token: int) -> bool:
        """Record a token and stream the new text; True while the request goes on."""
        tokenizer = self.engine.base.tokenizer
        finished = not seq.request.params.ignore_eos and (token in self.stop_ids or token in seq.prepared.stop_ids)
        if seq.constraint is not None:
            try:
                seq.constraint.accept(token)
            except GrammarError as err:  # this request's alone
                seq.fail(err)
                return False
        if not finished:
            seq.tokens.append(token)
            if seq.picked is not None:
                seq.logprobs.append(seq.picked)
        text = tokenizer.decode(seq.tokens, skip_special_tokens=True).lstrip()
        at = find_stop(text, seq.request.params.stop, seq.checked)
        seq.checked = len(text)
        final = finished or at is not None or len(seq.tokens) >= seq.max_new or seq.stream.cancelled.is_set()
        shown = text[:at] if at is not None else text
        logprobs = self._kept_logprobs(seq, at if final else None)
        if final or not shown.endswith("\ufffd"):  # hold back half a multi-byte character
            new = () if logprobs is None else logprobs[seq.sent:]
            seq.stream._emit(shown[len(seq.text) :], new)
            seq.text, seq.sent = shown, seq.sent + len(new)
        if final:
            reason = "length" if len(seq.tokens) >= seq.max_new and not finished and at is None else "stop"
            seq.stream._finish(ChatResult(seq.name, seq.text.strip(), len(seq.tokens), prompt_tokens=len(seq.prompt),
                                          finish_reason=reason, logprobs=logprobs))
        return not final

    def _kept_logprobs(self, seq: Running, cut: int | None) -> tuple[TokenLogprob, ...] | None:
        """The log-probabilities of the tokens whose text the reply shows: a stop string cuts the
        text, and the tokens past the cut go with it."""
        if seq.request.params.logprobs is None:
            return None
        kept = len(seq.logprobs)
        if cut is not None:
            decode = self.engine.base.tokenizer.decode
            while kept and len(decode(seq.tokens[: kept - 1], skip_special_tokens=True).lstrip()) >= cut:
                kept -= 1
        return tuple(seq.logprobs[:kept])



class GrowingKV:
    """transformers' DynamicCache for the running rows, left-padded to the longest: rows joining
    and leaving re-pad it, and every step appends one column."""

    graphs = None
    graph_error = None
    """Its steps are never captured (their shapes change every step)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached_len]: 0 where a row is left-padded

    def describe(self) -> str:
        return "growing KV cache"

    def fit(self, prompt: list[int], max_new: int) -> int:
        """The reply budget this cache allows: any (the model's context was applied already)."""
        return max_new

    def reset(self) -> None:
        self.cache, self.mask = None, None

    def decode(self, engine: Engine, running: list[Running], forward) -> torch.Tensor:
        last = torch.tensor([[s.tokens[-1]] for s in running])
        positions = self.mask.sum(-1, keepdim=True)  # each row's next position: its real tokens so far
        self.mask = torch.cat([self.mask, torch.ones(len(running), 1, dtype=self.mask.dtype)], dim=1)
        return forward(last, self.mask, positions, running, self.cache)

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows, left-padding the shorter side."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        layers = []
        for old, new in zip(self.cache.layers, cache.layers):
            keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
            layers.append((keys, values))
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)])

    def keep(self, keep: list[int]) -> None:
        if not keep:
            self.reset()
            return
        if self.cache is None:
            return
        index = torch.tensor(keep)
        self.cache.batch_select_indices(index.to(self.cache.layers[0].keys.device))
        self.mask = self.mask[index]
        self._trim_padding()

    def _trim_padding(self) -> None:
        """Drop cache columns that are padding in every remaining row."""
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        if first == 0:
            return
        self.mask = self.mask[:, first:]
        self.cache = DynamicCache(ddp_cache_data=[(l.keys[:, :, first:], l.values[:, :, first:]) for l in self.cache.layers])


class StaticKV:
    """The static row slots (serve/slots.py), and on a GPU the decode steps captured on them.

    A step runs a power-of-two bucket of rows; the rows past the running ones repeat the first
    row's adapter, so a batch on one adapter keeps that adapter's own path. `full_width` steps
    (the deterministic mode) run every slot, the free ones on the base: one shape whatever the load.
    """

    def __init__(self, slots: SlotCache, graphs: StepGraphs | None, full_width: bool = False):
        self.slots, self.graphs, self.full_width = slots, graphs, full_width
        self.graph_error: str | None = None
        """Why the loop stopped capturing steps, if it had to."""

    def describe(self) -> str:
        replayed = ", steps replayed as CUDA graphs" if self.graphs is not None else ""
        mode = ", deterministic (full-width steps, prompts prefilled alone)" if self.full_width else ""
        return f"static slots of {self.slots.context} tokens{replayed}{mode}"

    def fit(self, prompt: list[int], max_new: int) -> int:
        """A reply capped so that prompt and reply fit one row slot."""
        room = self.slots.context - len(prompt)
        if room <= 0:
            raise ContextLengthError(f"prompt is {len(prompt)} tokens, which fills the static decode cache's context of "
                                     f"{self.slots.context} tokens (the server's --graph-context, DecodeSettings.context)")
        return min(max_new, room)

    def reset(self) -> None:
        self.slots.rows = 0

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.slots.join(cache, mask)

    def keep(self, keep: list[int]) -> None:
        self.slots.keep(keep)

    def step_rows(self, keys: list[RowKey]) -> tuple[int, list[RowKey]]:
        """How many slot rows a step runs for these running rows, and each row's adapter key."""
        n = len(keys)
        if self.full_width:
            return self.slots.capacity, keys + [None] * (self.slots.capacity - n)
        rows = self.slots.bucket(n)
        return rows, keys + keys[:1] * (rows - n)

    def decode(self, engine: Engine, running: list[Running], _forward=None) -> torch.Tensor:
        """One step on the slots: captured and replayed on a GPU, eager elsewhere."""
        n = len(running)
        rows, keys = self.step_rows([r.adapter_key for r in running])
        router = engine.router
        if self.graphs is not None and router is not None:
            router.fix_masks(self.slots.capacity)  # a replayed step reads its rows' masks where it saw them
        model = causal_lm(engine.route(keys, replayed=self.graphs is not None))
        self.slots.set_tokens([s.tokens[-1] for s in running])
        if self.graphs is None:
            return self.slots.step(model, rows)[:n]
        signature, version = engine.step_signature()
        try:
            return self.graphs.run(self.slots, model, rows, signature, version)[:n]
        except RuntimeError as err:  # a capture this stack refuses: the same steps, eagerly, from now on
            log.exception("capturing a decode step failed; decoding without CUDA graphs")
            self.graphs, self.graph_error = None, f"{type(err).__name__}: {err}"
            return self.slots.step(model, rows)[:n]


class NoAllowedToken(RuntimeError):
    """A row whose grammar allows none of the tokens the model can give (a stop token it has
    not got, say); the request ends with this error, its neighbours go on."""

    code = "server_error"

    def __init__(self) -> None:
        super().__init__("response_format: the grammar allows no token the model can give here")


class NonFiniteLogits(RuntimeError):
    """A row's logits held NaN or infinity: that request fails, the others are sampled as usual."""

    code = "server_error"

    def __init__(self) -> None:
        super().__init__("the model produced non-finite logits for this request")


DETERMINISTIC_THREADS = 1
"""The deterministic mode's intra-op threads unless configured: a product split over another
number of threads may sum in another order, and timing the choice would make it vary by run."""


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, heads, len, dim] -> [batch, heads, width, dim], zeros in front."""
    missing = width - t.shape[2]
    return t if missing == 0 else torch.nn.functional.pad(t, (0, 0, missing, 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.nn.functional.pad(mask, (missing, 0))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under the row's raw logits, and the `top` likeliest tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logprobs, min(top, logprobs.numel())) if top else None
    alternatives = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else temperature, top-k and top-p sampling with the request's own generator."""
    if params.temperature == 0:
        return int(logits.argmax())
    # Shifted by the maximum first (softmax and the top-k and top-p cuts do not change), and the
    # temperature kept a normal float32: a vanishing one then sends the other tokens to -inf rather
    # than the likeliest to +inf, or to 0/0, and the probabilities to NaN.
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    scores = (logits - logits.max()) / temperature
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
