"""Is an adapter folder safe to load and does it fit a base? Checked without touching the engine.

Everything peft's `load_adapter` and the serving engine could fail on, or be corrupted by, is
checked here when an adapter is registered: the config's types, the rank the tensors really
have, which modules the config makes peft inject, finite floating-point weights in complete
A/B pairs, trained token rows that fit the base's vocabulary, the base the adapter was trained
on, and its chat template.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

from adapters.card import CARD_FILE, AdapterCard, read_card
from adapters.chat import Message, render_template
from adapters.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHAT_TEMPLATE_FILE

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
KEY_PREFIX = "base_model.model."
LORA_PARTS = {".lora_A.weight": 0, ".lora_B.weight": 1}
"""Tensor key suffix -> its place in a module's (A, B) pair."""
EMBEDDING_MARK = ".lora_embedding_"
TOKEN_ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"
"""How peft names the rows `trainable_token_indices` trains: `<module><suffix>`, [tokens, hidden]."""
ALL_LINEAR = "all-linear"
MAX_LISTED = 3
"""Modules named in one reason before the rest are counted."""

PROBE_USER = "Probe question: what colour is the sky?"
PROBE_CONVERSATIONS = (
    (Message("user", PROBE_USER),),
    (Message("system", "You are a probe."), Message("user", PROBE_USER)),
)
# The registry has no tokenizer; any strings stand in for its special tokens, since a template
# only concatenates or compares them.
PROBE_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


class AdapterCheckError(ValueError):
    """An adapter that must not be served, with the reason."""


@dataclass(frozen=True)
class BaseShape:
    """What an adapter is checked against: the base's identity and its linear layers' shapes."""

    fingerprint: str
    architecture: str
    linear_shapes: dict[str, tuple[int, int]]
    """Module name -> (in_features, out_features) for every linear layer."""
    name_or_path: str = ""
    """The path or hub id the base was loaded from ('' when unknown)."""
    output_module: str = ""
    """The output head's module name, which peft's 'all-linear' leaves out ('' when none)."""
    input_module: str = ""
    """The input embedding's module name ('' when unknown)."""
    embedding_shape: tuple[int, int] = (0, 0)
    """The input embedding's [vocabulary, hidden] ((0, 0) when unknown)."""
    tied_embeddings: bool = False
    """The output head and the input embedding share one weight."""

    @classmethod
    def of(cls, model: torch.nn.Module, fingerprint: str, name_or_path: str | None = None) -> "BaseShape":
        """The shape of a loaded (or meta-device) model; its path is read from its config unless given."""
        shapes = {
            name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if hasattr(module, "in_features") and hasattr(module, "out_features")
        }
        architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
        if name_or_path is None:
            name_or_path = getattr(model.config, "_name_or_path", "") or ""
        head, embedding = _embeddings(model)
        return cls(fingerprint, architectures[0], shapes, str(name_or_path), _module_name(model, head),
                   _module_name(model, embedding), tuple(embedding.weight.shape) if embedding is not None else (0, 0),
                   head is not None and embedding is not None and head.weight is embedding.weight)


def _embeddings(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(the output head, the input embedding) where the model names them."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head, embedding


def _module_name(model: torch.nn.Module, target: torch.nn.Module | None) -> str:
    return next((name for name, module in model.named_modules() if target is not None and module is target), "")


@dataclass(frozen=True)
class AdapterShape:
    config: dict
    """adapter_config.json as written by peft."""
    lora_shapes: dict[str, tuple[int, int]]
    """Module name -> (in_features, out_features) implied by its lora_A and lora_B."""
    embedding_modules: tuple[str, ...] = ()
    """Modules with embedding LoRA weights (lora_embedding_A/B)."""
    lora_ranks: dict[str, int] = field(default_factory=dict)
    """Module name -> the rank its tensors have (lora_A's rows)."""
    weight_problems: tuple[str, ...] = ()
    """What is wrong with the tensors themselves (non-finite, unpaired, ...); refused by `check_adapter`."""
    card: AdapterCard | None = None
    """The adapter's card; set by `check_adapter` when the folder has one."""
    token_row_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Module name -> the shape of the token rows peft's `trainable_token_indices` trained in it."""


# -- the files ------------------------------------------------------------------------------

def read_adapter_files(folder: Path) -> AdapterShape:
    """Read an adapter's config and tensors, refusing pickles and damaged files.

    AdapterCheckError when the files cannot be read as a LoRA adapter at all; what is wrong with
    the tensors it does hold goes to its `weight_problems`, which `check_adapter` refuses.
    """
    folder = Path(folder)
    _refuse_pickles(folder)
    _require_files(folder)
    return adapter_shape(read_config(folder / ADAPTER_CONFIG), read_tensors(folder / ADAPTER_WEIGHTS))


def adapter_shape(config: dict, tensors: dict[str, torch.Tensor]) -> AdapterShape:
    """What `read_adapter_files` says of a config and its tensors, already read."""
    embeddings = sorted({key.split(EMBEDDING_MARK)[0].removeprefix(KEY_PREFIX) for key in tensors if EMBEDDING_MARK in key})
    if not embeddings and not any(_lora_part(key) for key in tensors):
        raise AdapterCheckError(f"{ADAPTER_WEIGHTS} holds no LoRA A/B matrices")
    pairs = _lora_pairs(tensors)
    shapes = {module: (a[1], b[0]) for module, (a, b) in pairs.items()}
    ranks = {module: a[0] for module, (a, _) in pairs.items()}
    rows = {module: tuple(t.shape) for module, t in token_row_tensors(tensors).items()}
    return AdapterShape(config, shapes, tuple(embeddings), ranks, tuple(tensor_problems(tensors)), token_row_shapes=rows)


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AdapterCheckError(
            f"pickled weights {pickles} refused: they can run code when loaded; save as safetensors"
        )


def _require_files(folder: Path) -> None:
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / name).is_file()]
    if missing and not any(folder.iterdir()):
        raise AdapterCheckError(f"empty folder: no {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS} (publish adapters with the store)")
    if missing:
        raise AdapterCheckError(f"missing {' and '.join(missing)}")


def read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterCheckError(f"{ADAPTER_CONFIG} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise AdapterCheckError(f"{ADAPTER_CONFIG} must be a JSON object, not {_json_kind(config)}")
    if config.get("peft_type") != "LORA":
        raise AdapterCheckError(f"{ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r} is not LORA")
    return config


def _json_kind(value: object) -> str:
    return {list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(value), "a number")


def read_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the file (adapters are small enough to read whole)."""
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises several types (a truncated file included)
        raise AdapterCheckError(f"{ADAPTER_WEIGHTS} is not a readable safetensors file: {err}") from err


def tensor_problems(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Weights the engine must not route: non-float or non-finite values, stray or unpaired tensors."""
    problems = []
    not_float = sorted(key for key, t in tensors.items() if not t.dtype.is_floating_point)
    if not_float:
        problems.append(f"tensors must be floating point; {_listed(not_float)} are {tensors[not_float[0]].dtype}")
    not_finite = sorted(key for key, t in tensors.items() if t.dtype.is_floating_point and not torch.isfinite(t.float()).all())
    if not_finite:
        problems.append(f"tensors hold NaN or inf values: {_listed(not_finite)}")
    stray = sorted(key for key in tensors if _lora_part(key) is None and EMBEDDING_MARK not in key
                   and not key.endswith(TOKEN_ROWS_SUFFIX))
    if stray:
        # peft would drop them, or load full layers into the base every request shares.
        problems.append(f"tensors that are not LoRA A/B matrices: {_listed(stray)}")
    problems.extend(_pair_problems(tensors))
    return problems


def _lora_part(key: str) -> tuple[str, int] | None:
    """(module name, 0 for A or 1 for B) for a LoRA matrix's key; None for any other tensor."""
    for suffix, index in LORA_PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)].removeprefix(KEY_PREFIX), index
    return None


def lora_halves(tensors: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor | None]]:
    """Module -> [its lora_A [r, in], its lora_B [out, r]] from a weights file's tensors, None for a missing half."""
    halves: dict[str, list[torch.Tensor | None]] = {}
    for key, tensor in tensors.items():
        part = _lora_part(key)
        if part is not None:
            halves.setdefault(part[0], [None, None])[part[1]] = tensor
    return halves


def _halves(tensors: dict[str, torch.Tensor]) -> dict[str, list[tuple[int, ...] | None]]:
    """`lora_halves`' shapes."""
    return {m: [None if t is None else tuple(t.shape) for t in pair] for m, pair in lora_halves(tensors).items()}


def _pair_problems(tensors: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    for module, (a, b) in sorted(_halves(tensors).items()):
        if a is None or b is None:
            problems.append(f"{module} has lora_{'B' if a is None else 'A'} but no lora_{'A' if a is None else 'B'}")
        elif len(a) != 2 or len(b) != 2:
            problems.append(f"{module}: lora_A {list(a)} and lora_B {list(b)} must be matrices")
        elif a[0] != b[1]:
            problems.append(f"{module}: lora_A has rank {a[0]} but lora_B has rank {b[1]}")
    return problems


def _lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Module -> (lora_A shape, lora_B shape) for the complete pairs."""
    return {m: (a, b) for m, (a, b) in _halves(tensors).items() if a is not None and b is not None}


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


# -- the adapter against a base -------------------------------------------------------------

def check_adapter(folder: Path, base: BaseShape) -> AdapterShape:
    """Raise AdapterCheckError with every reason the adapter cannot be served on this base.

    Returns the adapter with its card (None when it has none).
    """
    folder = Path(folder)
    adapter = read_adapter_files(folder)
    problems = config_problems(adapter.config) + unservable_variants(adapter) + list(adapter.weight_problems)
    if not problems:  # the rank, targets and token rows are only meaningful in a well-typed config
        problems += rank_problems(adapter) + target_problems(folder, adapter, base) + token_row_problems(adapter, base)
    card, identity = base_identity_problems(folder, adapter.config, base)
    problems += identity + shape_problems(adapter, base) + template_problems(folder)
    if problems:
        raise AdapterCheckError("; ".join(problems))
    return replace(adapter, card=card)


def config_problems(config: dict) -> list[str]:
    """Values in adapter_config.json peft would fail on, or build a broken layer from."""
    problems = []
    if not _positive_int(config.get("r")):
        problems.append(f"r must be a positive integer, got {config.get('r')!r}")
    if "lora_alpha" in config and not _positive_number(config["lora_alpha"]):
        problems.append(f"lora_alpha must be a finite positive number, got {config['lora_alpha']!r}")
    targets = config.get("target_modules")
    if not (_name(targets) or (isinstance(targets, list) and targets and all(_name(t) for t in targets))):
        problems.append(f"target_modules must be a module name pattern or a list of module names, got {targets!r}")
    for key, valid, what in (("rank_pattern", _positive_int, "positive integer ranks"),
                             ("alpha_pattern", _positive_number, "finite positive alphas")):
        problems += _pattern_problems(key, config.get(key) or {}, valid, what)
    return problems


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _name(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _pattern_problems(key: str, pattern: object, valid, what: str) -> list[str]:
    if not isinstance(pattern, dict) or not all(valid(v) for v in pattern.values()):
        return [f"{key} must map module names to {what}, got {pattern!r}"]
    for name in pattern:
        try:
            re.compile(name)
        except re.error as err:
            return [f"{key} key {name!r} is not a valid pattern: {err}"]
    return []


def rank_problems(adapter: AdapterShape) -> list[str]:
    """The rank peft will build each layer with (r, or rank_pattern's) must be the tensors' rank."""
    from peft.utils.other import get_pattern_key  # how peft picks a module's rank_pattern entry

    config = adapter.config
    pattern = config.get("rank_pattern") or {}
    wrong = []
    for module, rank in sorted(adapter.lora_ranks.items()):
        want = pattern.get(get_pattern_key(pattern.keys(), module), config["r"])
        if rank != want:
            wrong.append(f"{module} has rank {rank}, not {want}")
    if not wrong:
        return []
    return [f"{ADAPTER_CONFIG} gives r={config['r']}{' with a rank_pattern' if pattern else ''} "
            f"but the tensors disagree: {_listed(wrong)}"]


def target_problems(folder: Path, adapter: AdapterShape, base: BaseShape) -> list[str]:
    """peft injects by target_modules: every entry must select a base layer, and every module the
    tensors hold must be selected (else peft drops its weights)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        lora = LoraConfig.from_pretrained(str(folder))  # what the engine's load builds
    except (TypeError, ValueError, KeyError) as err:
        return [f"peft refuses {ADAPTER_CONFIG}: {err}"]
    if isinstance(lora.target_modules, str) and lora.target_modules.lower() == ALL_LINEAR:
        # peft's expansion of the shorthand: every linear layer but the output head
        lora.target_modules = set(base.linear_shapes) - {base.output_module}
    try:
        unmatched = _unmatched_targets(lora.target_modules, base, adapter.embedding_modules)
        unselected = [m for m in sorted(adapter.lora_shapes) if m in base.linear_shapes and not check_target_module_exists(lora, m)]
    except re.error as err:
        return [f"target_modules {lora.target_modules!r} is not a valid pattern: {err}"]
    problems = []
    if unmatched:
        problems.append(f"target_modules {unmatched} match no linear layer of the base")
    if unselected:
        problems.append(f"the weights hold {_listed(unselected)}, which target_modules does not select: peft would not load them")
    return problems


def _unmatched_targets(targets: str | set[str], base: BaseShape, embeddings: tuple[str, ...]) -> list[str]:
    """Entries of target_modules that select no linear layer (embeddings are refused elsewhere)."""
    layers = [*base.linear_shapes, *embeddings]
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, layer) for layer in layers) else [targets]
    return sorted(t for t in targets if not any(layer == t or layer.endswith(f".{t}") for layer in layers))


def unservable_variants(adapter: AdapterShape) -> list[str]:
    """What a plain-LoRA adapter does not have and the serving engine cannot compute per request.

    The engine adds each row's own scale·B·A to shared linear layers, and swaps in each row's own
    trained token rows (`trainable_token_indices`, checked by `token_row_problems`); anything else
    that changes the shared base itself (trained biases, full module copies, replicated layers)
    or that is not a low-rank product on a linear layer (DoRA's magnitudes, embedding LoRA, LoRA
    on raw parameters) would leak into other requests or be silently dropped, so it is refused
    when the adapter is registered.
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
    if config.get("target_parameters"):
        problems.append(f"target_parameters {config['target_parameters']}: LoRA on raw parameters (such as fused MoE "
                        "expert weights) is not served (linear layers only); train with --target-modules naming linear "
                        "layers instead, e.g. q_proj k_proj v_proj o_proj")
    if config.get("layer_replication"):
        problems.append("layer_replication would change the shared base's layers for every request")
    return problems


def shape_problems(adapter: AdapterShape, base: BaseShape) -> list[str]:
    """Every module the tensors name exists in the base with the shapes A and B imply."""
    problems = []
    for module, (a_in, b_out) in sorted(adapter.lora_shapes.items()):
        if module not in base.linear_shapes:
            problems.append(f"targets {module}, which the base does not have")
            continue
        want = base.linear_shapes[module]
        if (a_in, b_out) != want:
            problems.append(f"{module}: LoRA shapes give {(a_in, b_out)}, the base layer is {want}")
        if len(problems) > 5:
            break
    return problems


# -- trained token rows ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenRowSet:
    """The rows an adapter trained for a few token ids of one shared matrix."""

    token_ids: tuple[int, ...]
    rows: torch.Tensor
    """[tokens, hidden]: row i replaces the base's row for token_ids[i]."""


@dataclass(frozen=True)
class TokenRows:
    """An adapter's trained token rows (peft's `trainable_token_indices`) as they act on the base:
    on the input embedding, on the output head, or on both (None where they leave it alone)."""

    input: TokenRowSet | None = None
    output: TokenRowSet | None = None

    def __bool__(self) -> bool:
        return self.input is not None or self.output is not None


def token_row_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module name -> the token rows peft saved for it ([tokens, hidden])."""
    return {key.removeprefix(KEY_PREFIX).removesuffix(TOKEN_ROWS_SUFFIX): t
            for key, t in tensors.items() if key.endswith(TOKEN_ROWS_SUFFIX)}


def _token_targets(config: dict, base: BaseShape) -> tuple[dict[str, list], list[str]]:
    """The base module each entry of `trainable_token_indices` names -> its token ids, as peft
    resolves them (a list: the input embedding; a mapping: the modules whose names end with its
    keys); and what is wrong with the entries."""
    named = config.get("trainable_token_indices")
    if isinstance(named, list):
        named = {base.input_module: named}
    if not isinstance(named, dict) or not named:
        return {}, [f"trainable_token_indices must be a list of token ids or map module names to lists of them, "
                    f"got {named!r}"]
    targets, problems = {}, []
    for name, ids in named.items():
        named_ok = isinstance(name, str) and bool(name)
        module = next((m for m in (base.input_module, base.output_module) if m and named_ok and m.endswith(name)), None)
        if module is None:
            problems.append(f"trainable_token_indices names {name!r}, which is neither the base's input embedding "
                            f"{base.input_module!r} nor its output head {base.output_module!r}")
        else:
            problems += _token_id_problems(module, ids, base.embedding_shape[0])
            targets[module] = ids
    return targets, problems


def _token_id_problems(module: str, ids: object, vocab: int) -> list[str]:
    if not isinstance(ids, list) or not ids or not all(_token_id(i) for i in ids):
        return [f"trainable_token_indices for {module} must be a non-empty list of token ids, got {ids!r}"]
    outside = sorted(i for i in ids if i >= vocab)
    if vocab and outside:
        return [f"trainable_token_indices for {module}: token ids {outside[:MAX_LISTED]} are outside the base's "
                f"vocabulary of {vocab}"]
    if len(set(ids)) != len(ids):
        return [f"trainable_token_indices for {module} repeats token ids: {ids}"]
    return []


def _token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def token_row_problems(adapter: AdapterShape, base: BaseShape) -> list[str]:
    """Trained token rows the engine can swap in per request: for the base's input embedding or
    output head only, one row of the base's width per token id the config names, every named
    module's rows present (a tied head shares the embedding's) and none that it does not name.
    (Their values were checked with the other tensors: floating point, finite.)"""
    if not adapter.config.get("trainable_token_indices"):
        return [f"the weights hold token rows for {_listed(sorted(adapter.token_row_shapes))}, but "
                f"{ADAPTER_CONFIG} has no trainable_token_indices"] if adapter.token_row_shapes else []
    targets, problems = _token_targets(adapter.config, base)
    widths = {base.input_module: base.embedding_shape[1], base.output_module: base.linear_shapes.get(base.output_module, (0,))[0]}
    for module, ids in targets.items():
        shape = adapter.token_row_shapes.get(module)
        if shape is None and not _shares_embedding_rows(module, targets, base):
            problems.append(f"trainable_token_indices names {module}, but the weights hold no token rows for it")
        elif shape is not None and shape != (len(ids), widths[module]):
            problems.append(f"{module}: token rows {list(shape)}, expected [{len(ids)}, {widths[module]}] "
                            f"({len(ids)} token ids of width {widths[module]})")
    unnamed = sorted(set(adapter.token_row_shapes) - set(targets))
    if unnamed:
        problems.append(f"the weights hold token rows for {_listed(unnamed)}, which trainable_token_indices does not name")
    return problems


def _shares_embedding_rows(module: str, targets: dict[str, list], base: BaseShape) -> bool:
    """A tied output head named with the embedding's own ids: peft trains and saves them once, in the embedding."""
    return (base.tied_embeddings and module == base.output_module
            and targets.get(base.input_module) == targets[module])


def read_token_rows(folder: Path, base: BaseShape) -> TokenRows:
    """The adapter's trained token rows as they act on this base (float32, on the CPU): the
    embedding's rows on the input; on the output, the head's own rows, or on a tied base without
    them the embedding's (peft ties them so). AdapterCheckError for rows `check_adapter` refuses."""
    config = read_config(Path(folder) / ADAPTER_CONFIG)
    if not config.get("trainable_token_indices"):
        return TokenRows()  # what the engine loads most: answered from the config alone
    return token_rows_of(config, read_tensors(Path(folder) / ADAPTER_WEIGHTS), base)


def token_rows_of(config: dict, tensors: dict[str, torch.Tensor], base: BaseShape) -> TokenRows:
    """`read_token_rows` of a config and its tensors, already read (the engine reads the file once)."""
    if not config.get("trainable_token_indices"):
        return TokenRows()
    saved = {k: t for k, t in tensors.items() if k.endswith(TOKEN_ROWS_SUFFIX)}
    problems = token_row_problems(adapter_shape(config, tensors), base) + tensor_problems(saved)
    if problems:
        raise AdapterCheckError("; ".join(problems))
    targets, _ = _token_targets(config, base)
    sets = {m: TokenRowSet(tuple(targets[m]), t.float()) for m, t in token_row_tensors(saved).items()}
    own_output = sets.get(base.output_module)
    shared = sets.get(base.input_module) if base.tied_embeddings else None
    return TokenRows(sets.get(base.input_module), own_output or shared)


# -- which base it was trained on -------------------------------------------------------------

def base_identity_problems(folder: Path, config: dict, base: BaseShape) -> tuple[AdapterCard | None, list[str]]:
    """The card, and why the adapter was trained on another base.

    With a card, its fingerprint and architecture decide (the fingerprint is the stronger identity,
    so the config's base_model_name_or_path is not consulted). Without one, the config's
    base_model_name_or_path must name the served base, when both are known.
    """
    try:
        card = read_adapter_card(folder)
    except AdapterCheckError as err:
        return None, [str(err)]
    if card is None:
        return None, base_name_problems(config, base)
    problems = []
    if card.base.fingerprint != base.fingerprint:
        problems.append(f"trained on base {card.base.path} ({card.base.fingerprint}), served base is {base.fingerprint}")
    if card.base.architecture != base.architecture:
        problems.append(f"architecture {card.base.architecture}, served base is {base.architecture}")
    return card, problems


def read_adapter_card(folder: Path) -> AdapterCard | None:
    """The folder's card, None when it has none; AdapterCheckError when it is not a card."""
    path = Path(folder) / CARD_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterCheckError(f"{CARD_FILE} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise AdapterCheckError(f"{CARD_FILE} must be a JSON object, not {_json_kind(data)}")
    try:
        return read_card(folder)
    except ValueError as err:
        raise AdapterCheckError(str(err)) from err
    except (KeyError, TypeError, AttributeError) as err:  # a part that is not an object, e.g. "base": "x"
        raise AdapterCheckError(f"{CARD_FILE} is not an adapter card ({type(err).__name__}: {err})") from err


def base_name_problems(config: dict, base: BaseShape) -> list[str]:
    named = config.get("base_model_name_or_path")
    if not _name(named) or not base.name_or_path or base_names(named) & base_names(base.name_or_path):
        return []
    return [f"no {CARD_FILE}, and {ADAPTER_CONFIG} says base_model_name_or_path {named!r}, not the served base "
            f"{base.name_or_path!r}: serve it on its own base, or, if it was trained on this one, set "
            f"base_model_name_or_path to {base.name_or_path!r} (or publish it with the card training writes)"]


def base_names(name_or_path: str) -> set[str]:
    """The names a base goes by: as written, its folder's name, and the hub id of a hub-cache snapshot.

    A weak identity (two folders may share a name); the card's fingerprint is the strong one.
    """
    text = name_or_path.rstrip("/\\")
    names = {text, Path(text).name}
    cached = re.search(r"models--([^/\\]+?)--([^/\\]+)", text)  # .../models--org--name/snapshots/<commit>
    if cached:
        names |= {f"{cached[1]}/{cached[2]}", cached[2]}
    return {n for n in names if n}


# -- its chat template ---------------------------------------------------------------------------

def template_problems(folder: Path) -> list[str]:
    """The adapter's own chat template must render a user turn, its text included. A system turn
    it may refuse (Gemma's templates raise on one): that is the template's rule, which a request
    with a system message then meets as a clear error, but what it renders must hold the user's text."""
    path = Path(folder) / CHAT_TEMPLATE_FILE
    if not path.exists():
        return []
    try:
        template = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return [f"{CHAT_TEMPLATE_FILE} cannot be read: {err}"]
    for messages in PROBE_CONVERSATIONS:
        roles = "+".join(m.role for m in messages)
        try:
            text = render_template(template, messages, add_generation_prompt=True, special_tokens=PROBE_SPECIAL_TOKENS)
        except Exception as err:  # a template is code the adapter brings: whatever it raises refuses the adapter
            if messages[0].role == "system":
                continue
            return [f"{CHAT_TEMPLATE_FILE} fails on a {roles} conversation: {type(err).__name__}: {err}"]
        if not isinstance(text, str) or PROBE_USER not in text:
            return [f"{CHAT_TEMPLATE_FILE} renders a {roles} conversation without the user's message"]
    return []


def base_shape_from_config(path: str) -> BaseShape:
    """A base's shape without loading its weights: the model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapters.base import base_fingerprint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return BaseShape.of(model, base_fingerprint(path), name_or_path=path)
