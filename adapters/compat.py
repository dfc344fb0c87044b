"""Is an adapter folder safe to load and does it fit a base? Checked without loading weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from adapters.card import CARD_FILE, read_card
from adapters.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
KEY_PREFIX = "base_model.model."


class AdapterCheckError(ValueError):
    """An adapter that must not be served, with the reason."""


@dataclass(frozen=True)
class BaseShape:
    """What an adapter is checked against: the base's identity and its linear layers' shapes."""

    fingerprint: str
    architecture: str
    linear_shapes: dict[str, tuple[int, int]]
    """Module name -> (in_features, out_features) for every linear layer."""

    @classmethod
    def of(cls, model: torch.nn.Module, fingerprint: str) -> "BaseShape":
        shapes = {
            name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if hasattr(module, "in_features") and hasattr(module, "out_features")
        }
        architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
        return cls(fingerprint, architectures[0], shapes)


@dataclass(frozen=True)
class AdapterShape:
    config: dict
    """adapter_config.json as written by peft."""
    lora_shapes: dict[str, tuple[int, int]]
    """Module name -> (in_features, out_features) implied by its lora_A and lora_B."""
    embedding_modules: tuple[str, ...] = ()
    """Modules with embedding LoRA weights (lora_embedding_A/B)."""


def read_adapter_files(folder: Path) -> AdapterShape:
    """Read an adapter's config and tensor shapes, refusing pickles and damaged files."""
    folder = Path(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AdapterCheckError(
            f"pickled weights {pickles} refused: they can run code when loaded; save as safetensors"
        )
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterCheckError(f"missing {path.name}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterCheckError(f"{ADAPTER_CONFIG} is not valid JSON: {err}") from err
    if config.get("peft_type") != "LORA":
        raise AdapterCheckError(f"{ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r} is not LORA")
    shapes = _tensor_shapes(weights_path)
    embeddings = sorted({key.split(".lora_embedding_")[0].removeprefix(KEY_PREFIX) for key in shapes if ".lora_embedding_" in key})
    return AdapterShape(config, _lora_shapes(shapes), tuple(embeddings))


def _tensor_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:  # safetensors raises several types (a truncated file included)
        raise AdapterCheckError(f"{ADAPTER_WEIGHTS} is not a readable safetensors file: {err}") from err


def _lora_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    in_out: dict[str, list[int | None]] = {}
    for key, shape in shapes.items():
        for part, index in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part) and len(shape) == 2:
                module = key[: -len(part)].removeprefix(KEY_PREFIX)
                pair = in_out.setdefault(module, [None, None])
                pair[index] = shape[1] if index == 0 else shape[0]
    if not in_out:
        raise AdapterCheckError(f"{ADAPTER_WEIGHTS} holds no LoRA A/B matrices")
    return {m: (a, b) for m, (a, b) in in_out.items()}


def check_adapter(folder: Path, base: BaseShape) -> AdapterShape:
    """Raise AdapterCheckError with every reason the adapter cannot be served on this base."""
    adapter = read_adapter_files(folder)
    problems = unservable_variants(adapter)
    if (Path(folder) / CARD_FILE).is_file():
        card = read_card(folder)
        if card.base.fingerprint != base.fingerprint:
            problems.append(
                f"trained on base {card.base.path} ({card.base.fingerprint}), "
                f"served base is {base.fingerprint}"
            )
        if card.base.architecture != base.architecture:
            problems.append(f"architecture {card.base.architecture}, served base is {base.architecture}")
    for module, (a_in, b_out) in sorted(adapter.lora_shapes.items()):
        if module not in base.linear_shapes:
            problems.append(f"targets {module}, which the base does not have")
            continue
        want = base.linear_shapes[module]
        if (a_in, b_out) != want:
            problems.append(f"{module}: LoRA shapes give {(a_in, b_out)}, the base layer is {want}")
            if len(problems) > 5:
                break
    if problems:
        raise AdapterCheckError("; ".join(problems))
    return adapter


def unservable_variants(adapter: AdapterShape) -> list[str]:
    """What a plain-LoRA adapter does not have and the serving engine cannot compute per request.

    The engine adds each row's own scale·B·A to shared linear layers; anything that changes the
    shared base itself (trained biases, full module copies) or that is not a low-rank product on
    a linear layer (DoRA's magnitudes, embedding LoRA) would leak into other requests or be
    silently dropped, so it is refused when the adapter is registered.
    """
    config, problems = adapter.config, []
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported: the engine serves plain LoRA")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: fully trained module copies are not served per request")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("trained biases (bias / lora_bias) would change the shared base for every request")
    if adapter.embedding_modules:
        problems.append(f"LoRA on embedding layers {list(adapter.embedding_modules)} is not served (linear layers only)")
    return problems


def base_shape_from_config(path: str) -> BaseShape:
    """A base's shape without loading its weights: the model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapters.base import base_fingerprint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return BaseShape.of(model, base_fingerprint(path))
