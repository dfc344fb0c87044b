"""Greedy decode with a static KV cache, one step replayed from a captured CUDA graph.

An experiment for `make bench-gpu`, not a serving path: on the H200 run the 4-bit decode loop
reached 1-3% of the memory-bandwidth bound, which says the host (Python launching kernels one by
one), not the GPU, sets the pace. Replaying a graph launches a whole step at once, so comparing
the eager and graphed rates of the same model shows how much of a step the launches cost, and
whether a graphed step keeps an adapter's extra kernels within the issue's 0.85x of the base.

Everything a step needs lives in fixed tensors that the step updates itself on the device: the
cache (transformers' StaticCache keeps its length as a device tensor), the next token, and its
position. So the graph holds no host value that changes between steps. A routed adapter model
(serve/routing.py) is captured with the router's rows as they are at capture time.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import StaticCache

from serve.slots import causal_lm


@dataclass
class StaticDecode:
    """One greedy decode's fixed state: the cache, the current token and its position ([rows, 1])."""

    model: torch.nn.Module
    cache: StaticCache
    token: torch.Tensor
    position: torch.Tensor
    generated: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    @torch.no_grad()
    def prefill(cls, model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> "StaticDecode":
        """Run the prompt (eagerly) into a cache sized for it and `new_tokens` more."""
        inner = causal_lm(model)
        cache = StaticCache(config=inner.config, max_cache_len=ids.shape[1] + new_tokens + 1)
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        logits = inner(input_ids=ids, cache=cache, position_ids=positions, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        position = torch.full((ids.shape[0], 1), ids.shape[1], dtype=torch.long, device=ids.device)
        return cls(inner, cache, token, position, [token.clone()])

    @torch.no_grad()
    def step(self) -> None:
        """One token for every row, written back into `token`; `position` moves on by one."""
        logits = self.model(input_ids=self.token, cache=self.cache, position_ids=self.position, use_cache=True,
                            logits_to_keep=1).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.add_(1)

    def tokens(self) -> torch.Tensor:
        """[rows, generated]: the prefill's token and one per step so far."""
        return torch.cat(self.generated, dim=1)


def eager_decode(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The reference: the same static-cache steps run one by one from Python."""
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
    state = StaticDecode.prefill(model, ids, new_tokens)
    on_gpu = ids.device.type == "cuda"
    if graph and not on_gpu:
        raise ValueError("CUDA graphs need a CUDA device")
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
    _sync(ids.device)
    start = time.perf_counter()
    for _ in range(timed):
        _advance(state, step)
    _sync(ids.device)
    elapsed = time.perf_counter() - start
    return DecodeRun(state.tokens(), timed / elapsed if timed > 0 else 0.0)


def _advance(state: StaticDecode, step) -> None:
    step()
    state.generated.append(state.token.clone())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
