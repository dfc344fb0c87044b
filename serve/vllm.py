"""Serving the same adapter folders with vLLM's multi-LoRA server, for users who outgrow ours.

`python -m serve vllm` checks every servable adapter against vLLM's LoRA constraints and
prints (or, with --run, executes) `vllm serve` with each one as a LoRA module. vLLM is not a
dependency: the command is for the machine where it is installed.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from adapters.compat import PICKLE_SUFFIXES, read_adapter_files
from adapters.store import AdapterStore
from serve.registry import AdapterEntry

# vLLM's LoRAConfig accepts only these values for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The linear layers vLLM applies LoRA to in Llama-style decoders (it fuses q/k/v and gate/up itself).
VLLM_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


@dataclass(frozen=True)
class VllmPlan:
    command: list[str]
    modules: dict[str, str]
    """LoRA module name -> adapter folder."""
    excluded: dict[str, str]
    """Adapters that vLLM cannot serve -> why."""

    def shell(self) -> str:
        return " ".join(shlex.quote(part) for part in self.command)


def vllm_problems(entry: AdapterEntry) -> list[str]:
    """Why vLLM would refuse this adapter; empty when it can serve it."""
    adapter = read_adapter_files(entry.path)
    config, problems = adapter.config, []
    rank = int(config.get("r", 0))
    if rank > VLLM_RANKS[-1]:
        problems.append(f"rank {rank} is over vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    # What the weights adapt, by layer name: target_modules may be a regex or full paths.
    targets = {module.rsplit(".", 1)[-1] for module in adapter.lora_shapes}
    unsupported = sorted(targets - VLLM_TARGETS)
    if unsupported:
        problems.append(f"targets {unsupported}, which vLLM does not adapt (it adapts {sorted(VLLM_TARGETS)})")
    if config.get("use_dora"):
        problems.append("DoRA adapters are not supported by vLLM")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (fully trained layers) are not supported by vLLM")
    if config.get("trainable_token_indices"):
        problems.append("trained token rows (trainable_token_indices) are not supported by vLLM")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM loads LoRA A/B only")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module rank or alpha patterns are not supported by vLLM")
    if not (entry.path / "adapter_model.safetensors").is_file() or any(p.name.endswith(PICKLE_SUFFIXES) for p in entry.path.iterdir()):
        problems.append("weights must be adapter_model.safetensors alone")
    return problems


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest value vLLM accepts that fits the largest adapter rank."""
    need = max(ranks, default=1)
    return next(r for r in VLLM_RANKS if r >= need)


def vllm_plan(base_path: str, store: AdapterStore, entries: list[AdapterEntry], host: str = "127.0.0.1",
              port: int = 8000, quantized: bool = True, max_loras: int = 4) -> VllmPlan:
    """`vllm serve` for the base with every adapter vLLM can take as a LoRA module.

    Adapters trained by QLoRA were trained against the 4-bit base; `--quantization
    bitsandbytes` serves them on the same 4-bit NF4 weights (quantized=False serves bf16).
    Each module points at the store's name link, so a restarted vLLM picks up the newest version.
    """
    modules, excluded = {}, {}
    for entry in entries:
        problems = vllm_problems(entry)
        if problems:
            excluded[entry.name] = "; ".join(problems)
        else:
            modules[entry.name] = str(store.path(entry.name))
    ranks = [e.rank for e in entries if e.name in modules]
    command = ["vllm", "serve", base_path, "--host", host, "--port", str(port), "--enable-lora",
               "--max-lora-rank", str(max_lora_rank(ranks)), "--max-loras", str(max(1, min(max_loras, len(modules)))),
               "--max-cpu-loras", str(max(1, len(modules)))]
    if quantized:
        command += ["--quantization", "bitsandbytes"]
    if modules:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in modules.items())]
    return VllmPlan(command, modules, excluded)
