"""How a base model is loaded: 4-bit NF4 (QLoRA) by default, on the best device there is."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from adapters.chat import FALLBACK_CHAT_TEMPLATE, end_of_turn_token

log = logging.getLogger(__name__)

DEFAULT_BASE = "models/demo-base"
"""The base every command loads unless told otherwise: the demo base `make base` trains."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@dataclass
class BaseConfig:
    """Which base to load and how."""

    path: str = field(
        default=DEFAULT_BASE,
        metadata={"help": "Base model: a Hugging Face causal-LM folder, or a hub id where a network exists."},
    )
    quantize: bool = field(
        default=True,
        metadata={"help": "Load the frozen base in 4-bit NF4 with double quantization (QLoRA); --no-quant loads it unquantized (plain LoRA)."},
    )
    device: str = field(
        default="auto",
        metadata={"help": "'auto' picks cuda when there is one, else cpu; or name one ('cpu', 'cuda:1')."},
    )

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("base path is empty: give a model folder or a hub id")


@dataclass
class LoadedBase:
    """A loaded base with what callers need to know about it."""

    model: torch.nn.Module
    tokenizer: object
    config: BaseConfig
    device: torch.device
    compute_dtype: torch.dtype
    fingerprint: str
    chat_template_source: str = field(default="base")
    """'base' when the tokenizer came with a chat template, 'fallback' when ours was applied."""

    @property
    def quantization(self) -> str:
        return "nf4-double-quant" if self.config.quantize else "none"

    stop_token_ids: frozenset[int] | None = None
    """Token ids that end a reply (`stop_token_ids`); computed from the model and tokenizer when not given."""

    def __post_init__(self) -> None:
        if self.stop_token_ids is None:
            self.stop_token_ids = stop_token_ids(self.model, self.tokenizer)


def stop_token_ids(model, tokenizer, template: str | None = None) -> frozenset[int]:
    """Token ids that end a reply: every id the model's generation config lists as EOS (Llama-3
    lists three), the tokenizer's EOS, and the end-of-turn token the chat template (`template`,
    else the tokenizer's) writes after an assistant reply (`adapters.chat.end_of_turn_token`)."""
    ids = {tokenizer.eos_token_id}
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(listed if isinstance(listed, (list, tuple)) else [listed])
    ids.add(end_of_turn_id(tokenizer, template))
    return frozenset(i for i in ids if i is not None)


def end_of_turn_id(tokenizer, template: str | None = None) -> int | None:
    """The id of the token the chat template closes an assistant turn with; None when it writes none."""
    token = end_of_turn_token(tokenizer, template)
    return None if token is None else tokenizer.convert_tokens_to_ids(token)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def compute_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, fp32 on the CPU (bf16 matmuls are slow there)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.float32


def under_fsdp() -> bool:
    """True inside `accelerate launch` with an FSDP config (accelerate sets this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def quantization_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's storage format: NF4 weights, their scales quantized again (double quantization).

    Under FSDP the packed 4-bit bytes are held in tensors of the compute dtype, so FSDP can
    flatten them together with the unquantized weights into one shardable buffer.
    """
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if under_fsdp() else torch.uint8,
    )


def load_tokenizer(path: str):
    """The base's tokenizer with a chat template and a pad token guaranteed.

    Returns (tokenizer, template source). The pad token reuses an existing token so the
    model's embedding matrix never has to be resized.
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    source = "base"
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        source = "fallback"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer, source


def _device_map(device: torch.device):
    if device.type == "cuda":
        # One process per GPU under `accelerate launch`: each loads its own copy on its own GPU.
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        return {"": index}
    return {"": "cpu"}


def use_exact_4bit_kernels(model: torch.nn.Module) -> int:
    """Keep every 4-bit layer on bitsandbytes' dequantize-then-matmul path; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first forward in eval
    mode for a kernel that computes in bf16: a different model from the NF4 weights the adapter
    was trained against (training runs the exact path), different on CPUs without that
    instruction set, and stateful: any `state_dict()` (peft calls it when it loads or saves an
    adapter) unpacks the weight, and the next forward packs it again with a rounding that
    drifts. The exact path depends on nothing but the weights. docs/architecture.md#exact-4-bit
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_base(config: BaseConfig) -> LoadedBase:
    """Load the base model once, frozen, 4-bit unless `config.quantize` is False."""
    device = resolve_device(config.device)
    dtype = compute_dtype_for(device)
    tokenizer, template_source = load_tokenizer(config.path)
    # Under FSDP no device map: the ranks load on the CPU and FSDP moves each its shard.
    kwargs = {"dtype": dtype} if under_fsdp() else {"device_map": _device_map(device), "dtype": dtype}
    if config.quantize:
        kwargs["quantization_config"] = quantization_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(config.path, **kwargs)
    model.requires_grad_(False)
    model.eval()
    use_exact_4bit_kernels(model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        config=config,
        device=next(model.parameters()).device,
        compute_dtype=dtype,
        fingerprint=base_fingerprint(config.path),
        chat_template_source=template_source,
    )


def local_base_dir(path: str) -> Path | None:
    """The folder holding a base: the path itself, or a hub id's snapshot already in the cache."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any miss means 'not cached'; said below
        log.warning("base %s is not a folder nor in the hub cache (%s)", path, err)
        return None


def base_fingerprint(path: str) -> str:
    """A cheap identity for a base: config, tokenizer files, and weight file names and sizes.

    Hashing the weights themselves would take minutes for a real model; names and sizes
    catch a different checkpoint in practice, and the config catches a different architecture.
    """
    folder = local_base_dir(path)
    digest = hashlib.sha256()
    if folder is None:
        config = AutoConfig.from_pretrained(path).to_dict()
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        return "sha256:" + digest.hexdigest()[:32]
    config_text = (folder / "config.json").read_text()
    digest.update(json.dumps(json.loads(config_text), sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        file = folder / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    for file in sorted(folder.iterdir()):
        if file.name.endswith(WEIGHT_SUFFIXES):
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return "sha256:" + digest.hexdigest()[:32]
