"""Greedy decode on the serving loop's static cache (`serve/slots.py`), each step launched from
Python or replayed from one captured CUDA graph.

An experiment for `make bench-gpu`: on the GPU runs the 4-bit decode loop reached 1-4% of the
memory-bandwidth bound, which says the host (Python launching kernels one by one), not the GPU,
sets the pace. Timing the same steps eagerly and replayed shows what the launches cost, and
whether a replayed step keeps an adapter's extra kernels within the issue's 0.85x of the base,
without the decode loop's own bookkeeping around it. (The H100 runs in bench/results/ used
transformers' StaticCache here, which writes every row at one shared column; the slots write
each row at its own position, as the server needs.)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from bench.profiling import synchronize
from serve.slots import SlotCache, causal_lm


@dataclass
class StaticDecode:
    """One greedy decode on slots: the routed model, its slots (one per prompt row) and the tokens so far."""

    model: torch.nn.Module
    slots: SlotCache
    generated: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def prefill(cls, model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> "StaticDecode":
        """Run the prompts (eagerly, equal lengths) and copy their cache into slots sized for
        `new_tokens` more; the first token goes in as the next step's input."""
        inner = causal_lm(model)
        rows, width = ids.shape
        cache = DynamicCache()
        positions = torch.arange(width, device=ids.device).expand(rows, -1)
        logits = inner(input_ids=ids, cache=cache, position_ids=positions, use_cache=True, logits_to_keep=1).logits
        dtype = inner.get_input_embeddings().weight.dtype
        slots = SlotCache.for_model(inner, rows, width + new_tokens + 1, dtype, ids.device)
        slots.join(cache, torch.ones(rows, width, dtype=torch.long))
        first = logits[:, -1].argmax(-1, keepdim=True)
        slots.tokens.copy_(first)
        return cls(inner, slots, [first])

    def step(self) -> None:
        """One token for every row, written back as the next step's input (device work only)."""
        logits = self.slots.step(self.model, self.slots.capacity)
        self.slots.tokens.copy_(logits.argmax(-1, keepdim=True))

    def tokens(self) -> torch.Tensor:
        """[rows, generated]: the prefill's token and one per step so far."""
        return torch.cat(self.generated, dim=1)


def eager_decode(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The reference: the same steps run one by one from Python."""
    return static_decode(model, ids, new_tokens, graph=False).tokens


@dataclass(frozen=True)
class DecodeRun:
    tokens: torch.Tensor
    """[rows, new_tokens] greedy tokens (the prefill's first one included)."""
    steps_per_s: float
    """Decode steps per second over the timed steps (each step makes one token per row)."""


def static_decode(model, ids: torch.Tensor, new_tokens: int, graph: bool, warm_steps: int = 2) -> DecodeRun:
    """Prefill, run `warm_steps` steps untimed, then time the rest: each launched from Python, or
    (`graph`, CUDA only) replayed from one captured step.

    Before a capture CUDA wants the work run once on a side stream; the warm steps are that run
    (and they warm bitsandbytes and cuBLAS for the eager case alike). They produce real tokens:
    capturing runs nothing, so the captured step's first replay makes the next token.
    """
    on_gpu = ids.device.type == "cuda"
    if graph and not on_gpu:
        raise ValueError("CUDA graphs need a CUDA device")
    state = StaticDecode.prefill(model, ids, new_tokens)
    side = torch.cuda.Stream(device=ids.device) if on_gpu else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(ids.device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for _ in range(warm_steps):
            _advance(state, state.step)
    if side is not None:
        torch.cuda.current_stream(ids.device).wait_stream(side)
    step = state.step
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            state.step()
        step = captured.replay
    timed = new_tokens - 1 - warm_steps
    synchronize(ids.device)
    start = time.perf_counter()
    for _ in range(timed):
        _advance(state, step)
    synchronize(ids.device)
    elapsed = time.perf_counter() - start
    return DecodeRun(state.tokens(), timed / elapsed if timed > 0 else 0.0)


def _advance(state: StaticDecode, step) -> None:
    step()
    state.generated.append(state.slots.tokens.clone())


class HostSyncs(TorchDispatchMode):
    """Records operators that read a tensor's value back to the host (`.item()`, `bool(t)`,
    `nonzero`): on a GPU each waits for the device, and inside a CUDA graph capture each fails.
    Lets the CPU tests check that a decode step could be captured."""

    READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.item")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))
