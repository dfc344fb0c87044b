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
VOCABULARIES = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("spiece.model",),
    ("sentencepiece.bpe.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
)
"""The files that hold a tokenizer's vocabulary, one tuple per format (a `tokenizers` file,
sentencepiece models, byte-level BPE, WordPiece; a `*.tiktoken` file counts too): a folder needs
all the files of one. tokenizer_config.json and special_tokens_map.json hold settings, no vocabulary."""
TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"
CUSTOM_CODE_FILES = ("config.json", "tokenizer_config.json")
"""Where a folder's `auto_map` names classes in its own Python files (custom code)."""


class BaseFolderError(ValueError):
    """A base that cannot be loaded as it is; the message names the folder, what is wrong and what to do."""


COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""`BaseConfig.compute_dtype`'s choices."""


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
    compute_dtype: str = field(
        default="auto",
        metadata={"help": "The dtype the base computes in: 'auto' is bf16 on a GPU that has it (else fp16) and "
                          "float32 on the CPU; or float32, bfloat16, float16. On a CPU with AMX bf16 matrix "
                          "products are several times faster than float32's, yet a QLoRA training step measured "
                          "slower in bf16 there (docs/performance.md): float32 stays the CPU's default."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow a base whose folder brings its own Python code (an `auto_map` in config.json or "
                          "tokenizer_config.json), which loading it runs; without it such a base is refused. Read "
                          "that code first.", "flag": TRUST_REMOTE_CODE_FLAG},
    )

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("base path is empty: give a model folder or a hub id")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")


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


def compute_dtype_for(device: torch.device, choice: str = "auto") -> torch.dtype:
    """The dtype named, or for 'auto' bf16 where the GPU supports it and fp32 on the CPU (bf16
    products are slow on a CPU without AMX, and a default must not depend on which CPU runs it)."""
    if choice != "auto":
        return COMPUTE_DTYPES[choice]
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


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The base's tokenizer with a chat template and a pad token guaranteed.

    Returns (tokenizer, template source). The pad token reuses an existing token so the
    model's embedding matrix never has to be resized. A local folder is checked first
    (`check_tokenizer_files`, and `check_custom_code` for a tokenizer of its own code), so a
    missing file or custom code is refused naming the folder, not deep inside transformers.
    """
    folder = local_folder(path)
    if folder is not None:
        check_tokenizer_files(folder)
        check_custom_code(folder, trust_remote_code, only="AutoTokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise BaseFolderError(f"base {path}: its tokenizer did not load: {type(err).__name__}: {err}") from err
    source = "base"
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        source = "fallback"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer, source


def has_vocabulary(folder: Path) -> bool:
    return any(all((folder / n).is_file() for n in files) for files in VOCABULARIES) or any(folder.glob("*.tiktoken"))


def check_tokenizer_files(folder: Path) -> None:
    """Refuse a folder without a whole tokenizer: BaseFolderError names the folder, the tokenizer
    files it has and those it lacks (transformers' own error, about backends and converters, does not)."""
    if has_vocabulary(folder):
        return
    known = dict.fromkeys([*TOKENIZER_FILES, *(n for files in VOCABULARIES for n in files)])
    present = [n for n in known if (folder / n).is_file()]
    halves = [files for files in VOCABULARIES if any((folder / n).is_file() for n in files)]
    if halves:  # e.g. vocab.json without its merges.txt
        missing = ", ".join(n for files in halves for n in files if not (folder / n).is_file())
    else:
        formats = " or ".join(" + ".join(files) for files in VOCABULARIES)
        missing = f"a vocabulary: {formats} (or a *.tiktoken file)"
    has = f"a partial tokenizer ({', '.join(present)})" if present else "no tokenizer"
    raise BaseFolderError(f"base folder {folder} has {has}: missing {missing}. Copy the tokenizer files from where "
                          "the model came from, or write them with tokenizer.save_pretrained(folder)")


def custom_code(folder: Path) -> dict[str, str]:
    """What loading the folder would import from its own Python files: the `auto_map` entries of
    its config.json and tokenizer_config.json, as {'config.json AutoModelForCausalLM': 'modeling_x.XForCausalLM'}."""
    found = {}
    for name in CUSTOM_CODE_FILES:
        file = folder / name
        auto_map = json.loads(file.read_text()).get("auto_map") if file.is_file() else None
        for auto_class, target in (auto_map or {}).items():
            found[f"{name} {auto_class}"] = target if isinstance(target, str) else ", ".join(t for t in target if t)
    return found


def check_custom_code(folder: Path, allowed: bool, only: str | None = None) -> None:
    """Refuse a folder that brings its own code, unless `allowed` (`BaseConfig.trust_remote_code`).

    transformers would otherwise run that code (`trust_remote_code=True`), or, for an architecture
    it knows, silently load its own class in its place: a different model from the one the folder
    describes. `only`: consider the entries of this auto class alone (the tokenizer's: 'AutoTokenizer').
    """
    entries = {k: v for k, v in custom_code(folder).items() if only is None or k.endswith(f" {only}")}
    if entries and not allowed:
        listed = "; ".join(f"{k} -> {v}" for k, v in entries.items())
        raise BaseFolderError(f"base folder {folder} brings its own Python code, which loading it would run "
                              f"({listed}): refused. Read that code; if you trust it, pass {TRUST_REMOTE_CODE_FLAG} "
                              "(in a config file: trust_remote_code: true)")


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
    """Load the base model once, frozen, 4-bit unless `config.quantize` is False.

    Weights load in the compute dtype whatever the folder stores (bf16 on disk is float32 on the
    CPU), from one file or from shards with their index. BaseFolderError for a folder with custom
    code (without `trust_remote_code`) or an incomplete tokenizer, before any weight is read.
    """
    check_base_code(config)
    device = resolve_device(config.device)
    dtype = compute_dtype_for(device, config.compute_dtype)
    tokenizer, template_source = load_tokenizer(config.path, config.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(config.path, **_model_kwargs(config, device, dtype))
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
        fingerprint=base_fingerprint(config.path, config.trust_remote_code),
        chat_template_source=template_source,
    )


def _model_kwargs(config: BaseConfig, device: torch.device, dtype: torch.dtype) -> dict:
    # dtype given, never "auto": a folder's own dtype (bf16, fp16) would otherwise be the compute dtype
    kwargs = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if not under_fsdp():  # under FSDP no device map: the ranks load on the CPU and FSDP moves each its shard
        kwargs["device_map"] = _device_map(device)
    if config.quantize:
        kwargs["quantization_config"] = quantization_config(dtype)
    return kwargs


def check_base_code(config: BaseConfig) -> None:
    """BaseFolderError for a base folder that brings its own code, unless `config` allows it
    (`check_custom_code`); a base found only by hub id is checked by transformers when it loads."""
    folder = local_folder(config.path)
    if folder is not None:
        check_custom_code(folder, config.trust_remote_code)


def local_folder(path: str) -> Path | None:
    """The folder holding a base, found without the network: the path itself, or a hub id's
    snapshot already in the cache; None otherwise (quietly: `local_base_dir` says so)."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except (OSError, ValueError) as err:  # not cached, or not a hub id: loading by id says why, if it fails
        log.debug("base %s: no local folder (%s)", path, err)
        return None


def local_base_dir(path: str) -> Path | None:
    """`local_folder`, saying when there is none."""
    folder = local_folder(path)
    if folder is None:
        log.warning("base %s is not a folder nor in the hub cache", path)
    return folder


def base_fingerprint(path: str, trust_remote_code: bool = False) -> str:
    """A cheap identity for a base: config, tokenizer files, and weight file names and sizes.

    Hashing the weights themselves would take minutes for a real model; names and sizes
    catch a different checkpoint in practice, and the config catches a different architecture.
    """
    folder = local_base_dir(path)
    digest = hashlib.sha256()
    if folder is None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).to_dict()
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
