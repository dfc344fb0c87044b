"""The talk's table of trainable parameters by LoRA rank, idealised and counted exactly.

The talk treats a whole model of N parameters as one square matrix (sqrt(N) x sqrt(N)), so
LoRA of rank r adds 2·r·sqrt(N) parameters: a share of 2r/sqrt(N). Real models are many
rectangular matrices, so the exact share is counted here on the real architectures, built
from their configs on the meta device (no weights), for the default targets (every linear
layer but the output head).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, FalconConfig, LlamaConfig

RANKS = (1, 2, 8, 16, 512, 1024, 8192)
SIZES = {"7B": 7e9, "13B": 13e9, "70B": 70e9, "180B": 180e9}
# The talk's table, verbatim (percent).
TALK = {
    1: (0.00, 0.00, 0.00, 0.00),
    2: (0.01, 0.00, 0.00, 0.00),
    8: (0.02, 0.01, 0.01, 0.00),
    16: (0.04, 0.03, 0.01, 0.01),
    512: (1.22, 0.90, 0.39, 0.24),
    1024: (2.45, 1.80, 0.77, 0.48),
    8192: (19.58, 14.37, 6.19, 3.86),
}


def llama2(hidden: int, inter: int, layers: int, heads: int, kv: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=32000)


def real_configs() -> dict[str, object]:
    """Llama-2 7B/13B/70B and Falcon-180B shapes, from their published configs."""
    return {
        "7B": llama2(4096, 11008, 32, 32, 32),
        "13B": llama2(5120, 13824, 40, 40, 40),
        "70B": llama2(8192, 28672, 80, 64, 8),
        "180B": FalconConfig(hidden_size=14848, num_hidden_layers=80, num_attention_heads=232, num_kv_heads=8,
                             vocab_size=65024, new_decoder_architecture=True, parallel_attn=True, bias=False),
    }


def idealised_share(rank: int, n_params: float) -> float:
    """The talk's model: percent of 2·r·sqrt(N) over N."""
    return 100 * 2 * rank * math.sqrt(n_params) / n_params


def talk_rounding(value: float) -> float:
    """Round half up to 3 decimals, then to 2: the only rounding that gives every cell of the talk's
    table (r=2 on 7B is 0.0048%, shown there as 0.01%)."""
    third = math.floor(value * 1000 + 0.5) / 1000
    return math.floor(third * 100 + 0.5) / 100


@dataclass(frozen=True)
class Shape:
    total: int
    linears: list[tuple[int, int]]
    """(in_features, out_features) of every LoRA target."""

    def lora_params(self, rank: int) -> int:
        return sum(rank * (i + o) for i, o in self.linears)

    def share(self, rank: int) -> float:
        """Percent of trainable parameters among all (base + LoRA), as peft reports it."""
        lora = self.lora_params(rank)
        return 100 * lora / (self.total + lora)


def shape_of(config) -> Shape:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return Shape(sum(p.numel() for p in model.parameters()), linears)


def talk_table() -> list[str]:
    names = list(SIZES)
    lines = ["Idealised (the talk's formula 2r·sqrt(N)/N); talk's value in brackets; ✓ where equal at its precision",
             f"{'rank':>6} " + " ".join(f"{n:>22}" for n in names)]
    for rank in RANKS:
        cells = []
        for n, talk in zip(names, TALK[rank]):
            value = idealised_share(rank, SIZES[n])
            mark = "✓" if talk_rounding(value) == talk else "✗"
            cells.append(f"{value:9.4f}% [{talk:5.2f}%] {mark}")
        lines.append(f"{rank:>6} " + " ".join(f"{c:>22}" for c in cells))
    return lines


def exact_table(shapes: dict[str, Shape]) -> list[str]:
    lines = ["Exact (LoRA on every linear layer but the head; share of base + LoRA parameters)",
             f"{'rank':>6} " + " ".join(f"{n:>14}" for n in shapes),
             f"{'params':>6} " + " ".join(f"{s.total / 1e9:>13.2f}B" for s in shapes.values())]
    for rank in RANKS:
        lines.append(f"{rank:>6} " + " ".join(f"{s.share(rank):>13.4f}%" for s in shapes.values()))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments params-table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", action="append", default=[], help="Also count for this model folder or hub id (repeatable).")
    args = parser.parse_args(argv)
    print("\n".join(talk_table()))
    print()
    shapes = {f"Llama-2 {k}" if k != "180B" else "Falcon 180B": shape_of(c) for k, c in real_configs().items()}
    for base in args.base:
        shapes[base.rstrip("/").rsplit("/", 1)[-1]] = shape_of(AutoConfig.from_pretrained(base))
    print("\n".join(exact_table(shapes)))
    return 0
