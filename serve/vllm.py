"""Serving the same adapter folders with vLLM's multi-LoRA server, for users who outgrow ours.

`python -m serve vllm` checks every servable adapter against vLLM's LoRA rules and prints (or,
with --run, executes) `vllm serve` with each one as a `--lora-modules` entry in vLLM's JSON form.
With --out it also writes that list to a file and a folder for vLLM's filesystem resolver
(`VLLM_LORA_RESOLVER_CACHE_DIR`), which loads adapters by name at the first request.
vLLM is not a dependency: the commands are for the machine where it is installed.

The rules, and where vLLM states them (docs/adapter-format.md#handing-the-adapters-to-vllm):
vllm/lora/peft_helper.py (`PEFTHelper.from_dict`, `_validate_features`, `validate_legal`),
vllm/config/lora.py (`MaxLoRARanks`, `max_cpu_loras >= max_loras`), vllm/lora/models.py
(`from_local_checkpoint`: only the layers the model adapts), and
vllm/plugins/lora_resolvers/filesystem_resolver.py (`peft_type` and `base_model_name_or_path`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from adapters.compat import PICKLE_SUFFIXES, read_adapter_files
from adapters.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterStore
from serve.registry import AdapterEntry

# vLLM's LoRAConfig accepts only these values for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The linear layers vLLM applies LoRA to in Llama-style decoders (it fuses q/k/v and gate/up itself).
VLLM_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
PEFT_REQUIRED = ("r", "lora_alpha", "target_modules")
"""PEFTHelper's fields without a default: `from_dict` raises when one is missing."""
PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
"""`init_lora_weights` strings that only seed A and B (PEFTHelper._init_is_supported); the others
(PiSSA, OLoRA, CorDA, LoftQ) change the base weights when peft loads the adapter."""
UNSUPPORTED = (
    ("use_dora", "DoRA: vLLM refuses it ('vLLM does not yet support DoRA')"),
    ("modules_to_save", "fully trained module copies: vLLM refuses them on a causal LM"),
    ("lora_bias", "trained LoRA biases: vLLM refuses them"),
    ("layer_replication", "replicated layers: vLLM refuses them"),
    ("alora_invocation_tokens", "Activated LoRA: vLLM refuses it"),
    ("use_qalora", "QA-LoRA: vLLM refuses it"),
    ("use_bdlora", "block-diagonal LoRA: vLLM refuses it"),
    # The next three are read by the newest PEFTHelper only; from_dict drops fields it does not
    # know, so an older vLLM would load the adapter and silently serve something else.
    ("trainable_token_indices", "trained token rows: vLLM versions without selected-token support drop them"),
    ("rank_pattern", "per-module ranks: vLLM versions without pattern support scale every module by r"),
    ("alpha_pattern", "per-module alphas: vLLM versions without pattern support scale every module by lora_alpha"),
)
"""adapter_config.json fields that make an adapter one vLLM cannot serve as trained, when set."""

LORA_MODULES_FILE = "lora-modules.json"
RESOLVER_FOLDER = "loras"
COPIES = ".copies"
"""Inside the resolver folder: the copied versions its `<name>` links point at."""
RESOLVER_ENV = (("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true"), ("VLLM_PLUGINS", "lora_filesystem_resolver"))
"""What vLLM needs to load adapters through the filesystem resolver (vLLM's docs/design/lora_resolver_plugins.md)."""


# -- one adapter against vLLM's rules --------------------------------------------------------------

def peft_config_problems(config: dict, base: str) -> list[str]:
    """Why vLLM would refuse an adapter with this adapter_config.json when serving `base` (the
    model `vllm serve` is given); each reason names the field. Empty when it can serve it."""
    return [*_kind_problems(config), *_rank_problems(config), *_feature_problems(config),
            *_base_problems(config, base)]


def _kind_problems(config: dict) -> list[str]:
    problems = [f"{key} is missing: vLLM's PEFTHelper requires it" for key in PEFT_REQUIRED if key not in config]
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r}: vLLM serves LORA adapters only")
    return problems


def _rank_problems(config: dict) -> list[str]:
    rank = config.get("r")
    if "r" not in config:
        return []  # already named as missing
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return [f"r={rank!r}: vLLM needs a positive integer rank"]
    if rank > VLLM_RANKS[-1]:
        return [f"r={rank} is over {VLLM_RANKS[-1]}, the largest --max-lora-rank vLLM allows {list(VLLM_RANKS)}"]
    return []


def _feature_problems(config: dict) -> list[str]:
    problems = [f"{key}={config[key]!r}: {why}" for key, why in UNSUPPORTED if config.get(key)]
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM loads LoRA A/B only ('Adapter bias is not supported')")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r}: this init changes the base weights, which vLLM does not do")
    return problems


def _base_problems(config: dict, base: str) -> list[str]:
    named = config.get("base_model_name_or_path")
    if named == base:
        return []
    if not isinstance(named, str) or not named:
        return [f"base_model_name_or_path={named!r}: vLLM's filesystem resolver needs the name of the base"]
    # The resolver compares the two strings, not the models: "models/x" and "./models/x" differ.
    return [f"base_model_name_or_path={named!r} is not the served base {base!r}: vLLM's filesystem resolver "
            f"serves only adapters naming the base exactly as `vllm serve` is given it; if it is this base, "
            f"serve it as --base {named}, else serve the adapter on its own base"]


def adapter_config_problems(folder: Path, base: str) -> list[str]:
    """`peft_config_problems` for the adapter_config.json in `folder`, or why it cannot be read."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"{ADAPTER_CONFIG} cannot be read: {err}"]
    if not isinstance(config, dict):
        return [f"{ADAPTER_CONFIG} must be a JSON object"]
    return peft_config_problems(config, base)


def weight_problems(folder: Path) -> list[str]:
    """What vLLM's loader refuses in the weights: layers the model does not adapt, pickles."""
    adapter = read_adapter_files(folder)
    # What the weights adapt, by layer name: target_modules may be a regex or full paths.
    targets = {module.rsplit(".", 1)[-1] for module in adapter.lora_shapes}
    unsupported = sorted(targets - VLLM_TARGETS)
    problems = []
    if unsupported:
        problems.append(f"targets {unsupported}, which vLLM does not adapt (it adapts {sorted(VLLM_TARGETS)})")
    if not (folder / ADAPTER_WEIGHTS).is_file() or any(p.name.endswith(PICKLE_SUFFIXES) for p in folder.iterdir()):
        problems.append(f"weights must be {ADAPTER_WEIGHTS} alone")
    return problems


def vllm_problems(entry: AdapterEntry, base: str) -> list[str]:
    """Why vLLM would refuse this adapter on `base`; empty when it can serve it."""
    return adapter_config_problems(entry.path, base) + weight_problems(entry.path)


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest value vLLM accepts that fits the largest adapter rank."""
    need = max(ranks, default=1)
    return next(r for r in VLLM_RANKS if r >= need)


# -- the launch command ---------------------------------------------------------------------------

@dataclass(frozen=True)
class VllmPlan:
    base: str
    """The model `vllm serve` is given: vLLM's name for the base, which every adapter must name."""
    engine: list[str]
    """`vllm serve` with the base and the LoRA limits, without adapters (the resolver form)."""
    modules: dict[str, str]
    """LoRA module name -> the store's name link, absolute."""
    versions: dict[str, Path]
    """LoRA module name -> the version folder its checks read (what the resolver folder copies)."""
    excluded: dict[str, str]
    """Adapters that vLLM cannot serve -> why."""

    @property
    def command(self) -> list[str]:
        # The JSON form carries base_model_name, and a path holding '=' or ',' breaks vLLM's
        # `name=path` parser; JSON with its commas always takes vLLM's JSON branch.
        return self.engine + (["--lora-modules", *map(json.dumps, self.lora_modules())] if self.modules else [])

    def lora_modules(self) -> list[dict[str, str]]:
        """vLLM's `--lora-modules` JSON form (LoRAModulePath): name, path, base_model_name."""
        return [{"name": name, "path": path, "base_model_name": self.base} for name, path in self.modules.items()]

    def shell(self) -> str:
        return shlex.join(self.command)

    def resolver_shell(self, folder: Path) -> str:
        """The command that serves the adapters of a resolver folder, each loaded at its first request."""
        env = [*RESOLVER_ENV, ("VLLM_LORA_RESOLVER_CACHE_DIR", str(Path(folder).absolute()))]
        return " ".join(f"{key}={shlex.quote(value)}" for key, value in env) + " " + shlex.join(self.engine)


def engine_args(base: str, ranks: list[int], host: str, port: int, quantized: bool, max_loras: int) -> list[str]:
    """`vllm serve` for the base with LoRA enabled for adapters of these ranks.

    --max-cpu-loras holds every adapter, so vLLM never evicts one and reads it again from disk;
    vLLM requires it to be at least --max-loras (vllm/config/lora.py).
    """
    count = max(1, len(ranks))
    command = ["vllm", "serve", base, "--host", host, "--port", str(port), "--enable-lora",
               "--max-lora-rank", str(max_lora_rank(ranks)), "--max-loras", str(min(max(1, max_loras), count)),
               "--max-cpu-loras", str(count)]
    # vLLM quantizes the base to NF4 with double-quantized scales as it loads it, as QLoRA training
    # did (bitsandbytes_loader.py); a bf16 base differs by the quantization error the adapter never saw.
    return command + (["--quantization", "bitsandbytes"] if quantized else [])


def vllm_plan(base_path: str, store: AdapterStore, entries: list[AdapterEntry], host: str = "127.0.0.1",
              port: int = 8000, quantized: bool = True, max_loras: int = 4) -> VllmPlan:
    """`vllm serve` for the base with every adapter vLLM can take as a LoRA module.

    Each module points at the store's name link, so a restarted vLLM picks up the newest version.
    """
    modules, versions, excluded = {}, {}, {}
    for entry in entries:
        problems = vllm_problems(entry, base_path)
        if problems:
            excluded[entry.name] = "; ".join(problems)
        else:
            modules[entry.name] = str(store.path(entry.name).absolute())
            versions[entry.name] = entry.path
    ranks = [e.rank for e in entries if e.name in modules]
    return VllmPlan(base_path, engine_args(base_path, ranks, host, port, quantized, max_loras), modules, versions, excluded)


# -- the files handed to vLLM ---------------------------------------------------------------------

def write_lora_modules(path: Path, plan: VllmPlan) -> Path:
    """The `--lora-modules` JSON objects as one JSON list, replaced atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(plan.lora_modules(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class ResolverLayout:
    folder: Path
    served: dict[str, Path] = field(default_factory=dict)
    """Adapter name -> the copy `<folder>/<name>` points at."""
    refused: dict[str, str] = field(default_factory=dict)
    """Adapters with nothing under `<folder>` -> why."""
    removed: list[str] = field(default_factory=list)
    """Names this tool had put there before that are no longer served."""


def write_resolver_layout(folder: Path, plan: VllmPlan) -> ResolverLayout:
    """`<folder>/<name>/adapter_config.json` (and the rest) for each adapter of the plan; nothing
    for the refused ones, and names this tool wrote before that are no longer served are removed.

    Each `<name>` is a link to a copy of the version the checks read, under `<folder>/.copies`,
    swapped with one rename as the store swaps its own. Copies, not links into the store: vLLM's
    resolver resolves `<folder>/<name>` and refuses a path that leads outside the folder, and a
    copy keeps the files vLLM read even after the store publishes or prunes a version. Entries
    this tool did not make are left alone.
    """
    folder = Path(folder)
    (folder / COPIES).mkdir(parents=True, exist_ok=True)
    served, refused = {}, dict(plan.excluded)
    for name, version in plan.versions.items():
        if _foreign(folder / name):
            refused[name] = f"{folder / name} exists and was not made by this tool: left alone"
        else:
            served[name] = _publish_copy(folder, name, version)
    for name in plan.excluded:
        if _foreign(folder / name):
            refused[name] += f"; but {folder / name} exists (not made by this tool), and the resolver may serve it"
    return ResolverLayout(folder, served, refused, _remove_unserved(folder, set(served)))


def _foreign(path: Path) -> bool:
    """Something at `path` that is not a link this tool made."""
    return (path.exists() or path.is_symlink()) and not _ours(path)


def _ours(path: Path) -> bool:
    return path.is_symlink() and os.readlink(path).startswith(f"{COPIES}/")


def _publish_copy(folder: Path, name: str, version: Path) -> Path:
    """Copy `version` under .copies (once per content) and point `<folder>/<name>` at it."""
    copy = _copy_once(folder, name, version)
    previous = _point(folder / name, copy.relative_to(folder))
    _prune_copies(copy.parent, keep={copy, previous})
    return copy


def _copy_once(folder: Path, name: str, version: Path) -> Path:
    copy = folder / COPIES / name / f"{version.name}-{_content_key(version)}"
    if copy.is_dir():
        return copy
    staging = folder / COPIES / f".staging-{name}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(version, staging)  # follows links: the copy must not lead back to the store
        copy.parent.mkdir(exist_ok=True)
        os.replace(staging, copy)  # whole, or not there
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if not (isinstance(err, OSError) and copy.is_dir()):  # else another writer published this content first
            raise
    return copy


def _point(link: Path, target: Path) -> Path | None:
    """Swap `link` to `target` (relative to the link's folder) with one rename; returns what it pointed at."""
    previous = link.parent / os.readlink(link) if link.is_symlink() else None
    tmp = link.parent / COPIES / f".link-{link.name}-{uuid.uuid4().hex[:8]}"
    tmp.symlink_to(target, target_is_directory=True)  # a relative target reads from where the link lands
    os.replace(tmp, link)  # the one step the resolver can observe
    return previous


def _content_key(version: Path) -> str:
    """Names, sizes and change times of the version's files: a new key when anything in it changes
    (a store version never changes, but a folder dropped into the store by hand may)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in version.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(version)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def _prune_copies(copies: Path, keep: set[Path | None]) -> None:
    """Keep the current copy and the one before it: vLLM resolves a name once and may read that
    path again after evicting the adapter, so a vLLM started before this publish still finds it."""
    for old in copies.iterdir():
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _remove_unserved(folder: Path, served: set[str]) -> list[str]:
    removed = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name in served or not _ours(entry):
            continue
        entry.unlink()  # first the name, so the resolver stops finding it, then its files
        shutil.rmtree(folder / COPIES / entry.name, ignore_errors=True)
        removed.append(entry.name)
    return removed


@dataclass(frozen=True)
class Handoff:
    lora_modules: Path
    layout: ResolverLayout


def write_handoff(out: Path, plan: VllmPlan) -> Handoff:
    """Both forms under `out`: lora-modules.json and the resolver folder loras/."""
    out = Path(out)
    return Handoff(write_lora_modules(out / LORA_MODULES_FILE, plan), write_resolver_layout(out / RESOLVER_FOLDER, plan))
