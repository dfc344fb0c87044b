"""An adapter's LoRA weights read straight from its PEFT files: per adapted module, A, B and the
scale peft would give it.

The server keeps every resident adapter in stacked tensors (serve/routing.py) and never runs
peft's own per-adapter layers, so handing each adapter to peft (`add_adapter`, `load_adapter`)
only to copy its weights out again costs a walk over every module of the model, twice, plus
a random initialisation the loaded weights overwrite: most of a cache miss's time on a small
model. Reading the safetensors file here gives the same tensors and the same scales without
touching the model. The folder is assumed checked (`adapters.compat.check_adapter`): complete
A/B pairs, ranks that match the config, plain LoRA on linear layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.compat import lora_halves, read_config, read_tensors
from adapters.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: its delta is scale · B · A."""

    A: torch.Tensor
    """[r, in]."""
    B: torch.Tensor
    """[out, r]."""
    scale: float
    """alpha / r (alpha / √r with rsLoRA), exactly as peft computes `LoraLayer.scaling`."""

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class AdapterWeights:
    """Module name (as in the base model, e.g. `model.layers.0.self_attn.q_proj`) -> its pair."""

    pairs: Mapping[str, LoraPair]

    def modules(self) -> set[str]:
        return set(self.pairs)

    def nbytes(self) -> int:
        return sum(p.A.numel() * p.A.element_size() + p.B.numel() * p.B.element_size() for p in self.pairs.values())

    def check_finite(self) -> None:
        """ValueError naming the first tensor with a NaN or an infinity: on a mixed step one
        adapter's NaN would reach every row of the batch."""
        for module, pair in self.pairs.items():
            for part, tensor in (("lora_A", pair.A), ("lora_B", pair.B)):
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"{module}.{part}.weight holds non-finite values")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "AdapterWeights":
        """A copy on `device` (in `dtype`, else each tensor's own) that shares no storage with this one."""
        def moved(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype or t.dtype, copy=True)

        return AdapterWeights({m: LoraPair(moved(p.A), moved(p.B), p.scale) for m, p in self.pairs.items()})


def lora_scale(config: Mapping, module: str) -> float:
    """The scale peft gives `module` for this adapter_config.json: its rank and alpha from
    rank_pattern / alpha_pattern (matched as peft matches them) or r / lora_alpha."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank = ranks.get(get_pattern_key(ranks.keys(), module), config["r"])
    default_alpha = LoraConfig.__dataclass_fields__["lora_alpha"].default
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config.get("lora_alpha", default_alpha))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter_weights(folder: Path) -> AdapterWeights:
    """Every LoRA pair in a checked adapter folder, on the CPU in the file's dtype."""
    folder = Path(folder)
    return adapter_weights(read_config(folder / ADAPTER_CONFIG), read_tensors(folder / ADAPTER_WEIGHTS))


def adapter_weights(config: Mapping, tensors: dict[str, torch.Tensor]) -> AdapterWeights:
    """Every LoRA pair among a checked adapter's tensors, already read, with peft's scale for each."""
    halves = lora_halves(tensors)
    return AdapterWeights({module: LoraPair(a, b, lora_scale(config, module)) for module, (a, b) in halves.items()})
