"""Regional torch.compile: each decoder block's training forward compiled once, shared by all blocks.

A QLoRA step on a GPU spends most of its time launching kernels, not running them (bench-gpu on an
H100, 8B shape: the GPU busy 37% of a step, about 13,000 kernels per step). Inductor fuses a
block's element-wise work (RMSNorm's half-dozen ops, RoPE, SiLU·mul, the LoRA branch's casts and
scale) into a few generated kernels; bitsandbytes' 4-bit ops stay calls of their own (they are
registered torch ops). Compiling the block, not the whole model, is what keeps it cheap: the
blocks share one code object, so one compilation serves all of them.

Only training steps run compiled (module in training mode, gradients on, which includes the
recompute of gradient checkpointing). Evals and generation run eagerly: generation's growing KV
cache would make every new length a new graph, and an eval pass is a handful of forwards.
"""

from __future__ import annotations

import types

import torch


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
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, backend=backend, dynamic=True)
        block.forward = types.MethodType(_dispatch(compiled[cls], cls.forward), block)
    return len(blocks)


def _dispatch(compiled, eager):
    def forward(self, *args, **kwargs):
        run = compiled if self.training and torch.is_grad_enabled() else eager
        return run(self, *args, **kwargs)

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
