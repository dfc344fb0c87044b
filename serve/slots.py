"""A fixed-shape KV cache for the decode loop, so that a decode step can be captured once as a
CUDA graph and replayed (`ContinuousBatcher(..., decode=DecodeSettings(static_cache=True))`).

Why: on a GPU the eager decode loop is bound by the host launching kernels one by one, and a
replayed graph decodes several times faster with the same tokens (docs/performance.md#decode-cache).
A graph replays fixed kernels on fixed addresses, so everything a step touches
must keep its shape and storage from step to step:

- the cache holds `capacity` row slots of `context` columns per layer; the running requests are
  rows 0..n-1, in the decode loop's order, and a step runs on the first `bucket(n)` rows (a power
  of two), one graph per bucket;
- each row keeps its own tokens at columns 0..len-1 (no left padding): a step writes each row's
  new key and value at that row's own position, and `valid` masks the columns past each row's end;
- the step's inputs (each row's last token, its position) and the attention mask are buffers the
  loop fills in place before a replay; the routed adapters' row masks are the router's fixed
  buffers (`LoraRouter.fix_masks`).

The prefill of joining requests stays eager (its shapes vary): their caches are copied into
free slots. Without CUDA (the CPU, the tests) the same steps run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import StaticLayer

from adapters.cli import AT_LEAST_ONE, opt


@dataclass(frozen=True)
class DecodeSettings:
    """How the decode loop keeps its KV cache."""

    static_cache: bool | None = opt(
        None, "Decode from static row slots (serve/slots.py), each step captured once as a CUDA graph and replayed "
              "(the CPU runs the same steps eagerly), instead of a KV cache that grows and is re-padded every step. "
              "Default: on where the steps replay as CUDA graphs (a GPU, SDPA attention) and the slots fit "
              "(DEFAULT_SLOTS_SHARE); --no-static-cache keeps the growing cache. --cuda-graphs/--no-cuda-graphs: "
              "the flag's old name. See docs/performance.md#device-dependent-defaults.",
        aliases=("--cuda-graphs",))
    context: int = opt(
        1024, "With the static slots: tokens of prompt and reply one request may hold (replies are capped to fit, "
              "as by the model's own context; a longer prompt is refused, naming this limit). --graph-context: "
              "the flag's old name.",
        aliases=("--graph-context",), range=AT_LEAST_ONE)
    capture_graphs: bool = opt(
        True, "With the static slots on a CUDA device, capture each batch bucket's step once and replay it; "
              "--no-capture-graphs launches the same steps eagerly.")
    deterministic: bool = opt(
        False, "Every request's tokens (greedy, and seeded sampling) are the same whatever else the server runs: "
               "prompts prefilled alone, full-width decode steps on the static slots, per-row LoRA products, one "
               "thread count (serve/batcher.py; docs/architecture.md#deterministic-mode; its cost: "
               "docs/performance.md#determinism).")

    def uses_static_cache(self, device: torch.device, attention: str | None) -> bool:
        """Whether a decode loop on this device, with this attention implementation, keeps the slots."""
        if self.deterministic:
            return True
        if self.static_cache is not None:
            return self.static_cache
        return self.replays_steps(device) and attention == "sdpa"  # the slots' mask is one only SDPA reads

    def replays_steps(self, device: torch.device) -> bool:
        return self.capture_graphs and device.type == "cuda"


def device_free_bytes(device: torch.device) -> int:
    """A CUDA device's free memory, by the driver's count (default slots are chosen on CUDA only)."""
    return torch.cuda.mem_get_info(device)[0]


DEFAULT_SLOTS_SHARE = 0.5
"""The most of the device's free memory (after the base) that the slots may take when they are the
default rather than asked for: larger, the decode loop keeps the growing cache, which allocates
only what the running requests hold. (`SlotCache.bytes_for` gives the size: a 13B model without
grouped KV heads would need more than a 24 GB card has.)"""


class SlotLayer(StaticLayer):
    """One decoder layer's slice of the slots: writes each row's new key and value at that row's
    own position (transformers' static layers write every row at one shared column)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values, self.positions = keys, values, positions  # views of the first rows
        self.device, self.dtype = keys.device, keys.dtype
        self.batch_size, self.num_heads, _, self.k_head_dim = keys.shape
        self.v_head_dim = values.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [rows, heads, 1, dim]; each row's column is its position.
        at = self.positions.view(-1, 1, 1, 1)
        self.keys.scatter_(2, at.expand(-1, self.num_heads, 1, self.k_head_dim), key_states)
        self.values.scatter_(2, at.expand(-1, self.num_heads, 1, self.v_head_dim), value_states)
        return self.keys, self.values


def _kv_layout(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers decoder."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


class SlotCache:
    """The fixed buffers, and the bookkeeping the decode loop does on them between steps."""

    def __init__(self, capacity: int, context: int, layers: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.capacity, self.context, self.rows = capacity, context, 0
        shape = (capacity, kv_heads, context, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.valid = torch.zeros(capacity, context, dtype=torch.bool, device=device)
        """[slot, column]: True where the row has a token (set for a step's column inside the step)."""
        self.positions = torch.zeros(capacity, 1, dtype=torch.long, device=device)
        """Each row's next position, which is also the column its next token is written at."""
        self.tokens = torch.zeros(capacity, 1, dtype=torch.long, device=device)
        """Each row's last token: the next step's input."""
        self._views: dict[int, Cache] = {}

    @classmethod
    def for_model(cls, model: torch.nn.Module, capacity: int, context: int, dtype: torch.dtype,
                  device: torch.device) -> "SlotCache":
        return cls(capacity, context, *_kv_layout(model), dtype, device)

    @staticmethod
    def bytes_for(model: torch.nn.Module, capacity: int, context: int, dtype: torch.dtype) -> int:
        """What `for_model` would allocate for its keys and values."""
        layers, kv_heads, head_dim = _kv_layout(model)
        return 2 * layers * capacity * kv_heads * context * head_dim * dtype.itemsize

    def bucket(self, rows: int) -> int:
        """The smallest power of two holding `rows`, at most the capacity: one captured step each."""
        return min(self.capacity, 1 << max(0, rows - 1).bit_length())

    def view(self, rows: int) -> Cache:
        """A transformers cache over the first `rows` slots (the same object for the same count)."""
        if rows not in self._views:
            self._views[rows] = Cache(layers=[SlotLayer(k[:rows], v[:rows], self.positions[:rows])
                                              for k, v in zip(self.keys, self.values)])
        return self._views[rows]

    @torch.no_grad()
    def step(self, model: torch.nn.Module, rows: int) -> torch.Tensor:
        """One decode step for the first `rows` slots; returns their last-position logits.

        Only device work on fixed buffers, no value read back to the host: it can be captured.
        """
        self.valid.scatter_(1, self.positions, True)  # this step's column, for every slot
        out = model(input_ids=self.tokens[:rows], position_ids=self.positions[:rows],
                    attention_mask=self.valid[:rows, None, None, :], cache=self.view(rows), use_cache=True,
                    logits_to_keep=1)
        # Past its context a free slot's position stays in range; a request never gets there.
        self.positions.add_(1).clamp_(max=self.context - 1)
        return out.logits[:, -1]

    def set_tokens(self, tokens: list[int]) -> None:
        """The running rows' last tokens, the next step's input."""
        self.tokens[: len(tokens), 0] = torch.tensor(tokens, dtype=torch.long)

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Copy prefilled rows (a left-padded batch: `mask` [rows, width], 0 on padding) into the
        next free slots, each row's real tokens at columns 0..len-1."""
        lengths = mask.sum(-1).tolist()
        width = mask.shape[1]
        start = self.rows
        if start + len(lengths) > self.capacity:
            raise RuntimeError(f"{start + len(lengths)} rows do not fit {self.capacity} slots")
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            prefilled = cache.layers[layer]
            for row, length in enumerate(lengths):
                keys[start + row, :, :length] = prefilled.keys[row, :, width - length :]
                values[start + row, :, :length] = prefilled.values[row, :, width - length :]
        for row, length in enumerate(lengths):
            self.valid[start + row] = False
            self.valid[start + row, :length] = True
            self.positions[start + row, 0] = length
        self.rows += len(lengths)

    def keep(self, kept: list[int]) -> None:
        """Keep these running rows (ascending indices), moved down to slots 0..len-1 in order."""
        for new, old in enumerate(kept):
            if new == old:
                continue
            for buffers in (self.keys, self.values):
                for layer in buffers:
                    layer[new].copy_(layer[old])
            for buffer in (self.valid, self.positions, self.tokens):
                buffer[new].copy_(buffer[old])
        self.rows = len(kept)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (its adapted layers stay in place), or the model:
    a step needs nothing from the wrapper, and on the host every call through it costs time."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class StepGraphs:
    """Captured decode steps, one per (rows, route signature), replayed on the same buffers.

    A key's first step runs eagerly on a side stream (CUDA wants the work run once before a
    capture); its second is captured and replayed, and later ones replay. A capture records the
    addresses of the router's stacks, so all are dropped when the router's version changes (an
    adapter loaded or evicted). Each graph keeps its own memory pool, so one graph's replay never
    writes where another's output lives.
    """

    def __init__(self) -> None:
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._seen: set[tuple] = set()
        self._version: object = None
        self.captures = 0

    def run(self, slots: SlotCache, model: torch.nn.Module, rows: int, signature: tuple, version: object) -> torch.Tensor:
        if version != self._version:
            self._graphs.clear()
            self._seen.clear()
            self._version = version
        key = (rows, signature)
        if key in self._graphs:
            graph, logits = self._graphs[key]
            graph.replay()
            return logits
        if key not in self._seen:
            self._seen.add(key)
            return self._on_side_stream(slots, model, rows)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # records; runs nothing
            logits = slots.step(model, rows)
        self._graphs[key] = (graph, logits)
        self.captures += 1
        graph.replay()
        return logits

    @staticmethod
    def _on_side_stream(slots: SlotCache, model: torch.nn.Module, rows: int) -> torch.Tensor:
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            logits = slots.step(model, rows)
        main.wait_stream(side)
        return logits
