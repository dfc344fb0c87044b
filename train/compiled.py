"""Regional torch.compile: each decoder block's training forward compiled once, shared by all blocks.

A QLoRA step on a GPU spends much of its time launching kernels rather than running them (the
profiles behind docs/performance.md show it per shape). Inductor fuses a
block's element-wise work (RMSNorm's half-dozen ops, RoPE, SiLU·mul, the LoRA branch's casts and
scale) into a few generated kernels; bitsandbytes' 4-bit ops stay calls of their own (they are
registered torch ops). Compiling the block, not the whole model, is what keeps it cheap: the
blocks share one code object, so one compilation serves all of them.

Gradient checkpointing stays outside the compiled region. transformers 5 puts the checkpoint in
the block class's own `forward` (`GradientCheckpointingLayer`); compiling that traces the
checkpoint into the graph, and Inductor's backward then holds a larger working set than eager
recompute does (measured on a GPU: docs/history/). So the layer's
forward underneath the wrapper is what gets compiled, and the checkpoint runs eagerly around it,
recomputing the compiled forward in the backward pass.

Only training steps run compiled (module in training mode, gradients on, which includes the
recompute of gradient checkpointing). Evals and generation run eagerly: generation's growing KV
cache would make every new length a new graph, and an eval pass is a handful of forwards.
"""

from __future__ import annotations

import functools
import types

import torch

CACHE_ARGUMENTS = ("cache", "past_key_values", "layer_past")
"""A block given a KV cache runs transformers' own forward: its checkpoint wrapper decides what to
drop from the cache under checkpointing, and no training step passes one."""


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model: the classes it names in `_no_split_modules`."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: torch.nn.Module, backend="inductor") -> int:
    """Compile every decoder block's training forward; returns how many blocks were changed.
    `backend` is torch.compile's (tests pass one that counts the graphs it is given)."""
    blocks = [b for b in decoder_blocks(model) if "forward" not in b.__dict__]
    compiled: dict[type, object] = {}  # one per block class: every block of a class shares it
    for block in blocks:
        cls = type(block)
        layer_forward, checkpoints_itself = unwrap_checkpointing(cls.forward)
        if cls not in compiled:
            compiled[cls] = torch.compile(layer_forward, backend=backend, dynamic=True)
        block.forward = types.MethodType(_dispatch(compiled[cls], cls.forward, checkpoints_itself), block)
    return len(blocks)


def unwrap_checkpointing(forward):
    """(the layer's forward, whether `forward` was transformers' checkpointing wrapper around it).
    The wrapper is recognised by its code object, which functools.wraps leaves as it is."""
    if forward.__code__.co_name == "forward_with_checkpointing" and hasattr(forward, "__wrapped__"):
        return forward.__wrapped__, True
    return forward, False


def _dispatch(compiled, eager, checkpoints_itself: bool):
    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()) or any(kwargs.get(k) is not None for k in CACHE_ARGUMENTS):
            return eager(self, *args, **kwargs)
        if checkpoints_itself and self.gradient_checkpointing:
            # what transformers' wrapper does, with the compiled forward inside the checkpoint
            return self._gradient_checkpointing_func(functools.partial(compiled, self, **kwargs), *args)
        return compiled(self, *args, **kwargs)

    forward.loraswap_compiled = True
    return forward


def uncompile_blocks(model: torch.nn.Module) -> int:
    """Undo `compile_blocks` (the blocks run their class's eager forward again); returns how many."""
    count = 0
    for block in decoder_blocks(model):
        if getattr(block.__dict__.get("forward"), "loraswap_compiled", False):
            del block.forward
            count += 1
    return count
