"""Training configuration: one typed dataclass per concern; a YAML file is a saved instance."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from adapters.base import BaseConfig
from adapters.store import check_name


def _opt(default, help: str, flag: str | None = None, **extra):
    """A config field whose help text doubles as its documentation and CLI help.

    extra: argparse's `nargs`, or `range`, the Range that `check_numbers` holds a number to.
    """
    meta = {"help": help, **({"flag": flag} if flag else {}), **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Range:
    """The interval a numeric setting must lie in; `text` is how an error states it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """True: `low` itself is excluded."""
    high_open: bool = True
    """True: `high` itself is excluded."""

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    @property
    def text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_plain(self.low)}"
        return f"in {'(' if self.low_open else '['}{_plain(self.low)}, {_plain(self.high)}{')' if self.high_open else ']'}"


def _plain(bound: float | None) -> str:
    return str(int(bound)) if bound is not None and float(bound).is_integer() else str(bound)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)
"""[0, 1)."""
OPEN_UNIT = Range(0, 1, low_open=True)
"""(0, 1)."""
SEED = Range(0, 2**32 - 1, high_open=False)
"""What numpy's seed accepts (transformers' set_seed seeds numpy too)."""


def check_numbers(settings, section: str) -> None:
    """Check every int or float field of a config dataclass against the Range in its metadata.

    ValueError names the field and the value: a float must be a finite number (NaN slips past
    any `<=`, and inf or NaN settings train to NaN weights), an int a true int (not a bool).
    A numeric string is read as a float first: YAML 1.1 reads `2e-4` (no dot) as a string.
    """
    for f in fields(settings):
        bounds = f.metadata.get("range")
        value = getattr(settings, f.name)
        if bounds is None or value is None:
            continue
        where = f"{section}.{f.name}" if section else f.name
        if str(f.type).startswith("float"):
            setattr(settings, f.name, _check_float(where, value, bounds))
        else:
            _check_int(where, value, bounds)


def _check_float(where: str, value, bounds: Range) -> float | int:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number {bounds.text}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number {bounds.text}, got {value!r} ({type(value).__name__})")
    if not _finite(value) or not bounds.holds(value):
        raise ValueError(f"{where} must be {bounds.text} and finite, got {value}")
    return value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float (YAML reads `1` followed by 400 zeros as one)
        return False


def _check_int(where: str, value, bounds: Range) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer {bounds.text}, got {value!r} ({type(value).__name__})")
    if not bounds.holds(value):
        raise ValueError(f"{where} must be {bounds.text}, got {value}")


@dataclass
class LoraSettings:
    r: int = _opt(16, "LoRA rank: the inner size of A (r x in) and B (out x r).", range=POSITIVE)
    alpha: float = _opt(32.0, "LoRA alpha: the update is scaled by alpha / r.", range=POSITIVE)
    dropout: float = _opt(0.05, "Dropout on the LoRA branch's input.", range=UNIT)
    target_modules: list[str] = _opt(
        ["all-linear"],
        "Module names to adapt; 'all-linear' adapts every linear layer but the output head, "
        "which QLoRA needs to match 16-bit fine-tuning.",
        flag="--target-modules",
        nargs="+",
    )
    last_layers: int | None = _opt(
        None, "Adapt only the last N transformer blocks (the 'fine-tune the last layers' technique).",
        range=POSITIVE,
    )

    def __post_init__(self) -> None:
        check_numbers(self, "lora")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty")


OPTIMIZERS = ("adamw", "paged_adamw_8bit")


@dataclass
class OptimSettings:
    lr: float = _opt(2e-4, "Peak learning rate.", range=POSITIVE)
    warmup_ratio: float = _opt(0.05, "Share of the steps spent warming the learning rate up from 0.", range=UNIT)
    schedule: str = _opt("cosine", "Learning-rate schedule after warmup: cosine, linear or constant.")
    weight_decay: float = _opt(0.0, "AdamW weight decay on the LoRA matrices.", range=NON_NEGATIVE)
    epochs: float = _opt(1.0, "Passes over the training set (fractions allowed; 0 only with --max-steps).",
                         range=NON_NEGATIVE)
    max_steps: int | None = _opt(None, "Stop after this many optimizer steps (overrides epochs).", range=POSITIVE)
    micro_batch_size: int = _opt(8, "Examples per forward pass.", range=POSITIVE)
    grad_accum: int = _opt(1, "Micro-batches accumulated per optimizer step.", range=POSITIVE)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables).", range=NON_NEGATIVE)
    optimizer: str = _opt("adamw", "adamw (torch's; fused on a GPU: a few kernels step all the LoRA matrices) or "
                                   "paged_adamw_8bit (QLoRA's: 8-bit states paged to CPU memory under pressure; GPU only).")

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        check_numbers(self, "optim")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.epochs == 0 and not self.max_steps:
            raise ValueError(f"optim.epochs must be > 0 (or give optim.max_steps), got {self.epochs}")


@dataclass
class DataSettings:
    path: str = _opt("", "Training data: a JSONL file (chat messages, alpaca or prompt/completion).", flag="--data")
    eval_path: str | None = _opt(None, "Eval data file; without it a held-out fraction of --data is used.", flag="--eval-data")
    eval_fraction: float = _opt(0.1, "Share of --data held out for eval when no --eval-data is given.", range=OPEN_UNIT)
    max_eval_examples: int = _opt(200, "At most this many eval examples are scored (loss and exact match).",
                                  range=POSITIVE)
    max_length: int = _opt(512, "Longest example in tokens; longer ones are dropped or rejected (--on-long).",
                           range=Range(8, low_open=True))
    max_line_bytes: int = _opt(2**20, "Longest line of a data file in bytes; longer lines are dropped or rejected "
                                      "(--on-long) unread, so a giant line costs no more memory than this.",
                               range=POSITIVE)
    on_long: str = _opt("drop", "What to do with examples over --max-length tokens or lines over --max-line-bytes: "
                                "drop (counted and named) or error.")
    task: str = _opt("", "Task name recorded in the card (default: the data folder's name).")

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("data.path is required (--data FILE)")
        if self.on_long not in ("drop", "error"):
            raise ValueError(f"data.on_long must be drop or error, got {self.on_long!r}")
        check_numbers(self, "data")
        if not self.task:
            self.task = Path(self.path).parent.name or Path(self.path).stem


@dataclass
class TrainConfig:
    name: str = _opt("", "Adapter name in the store (letters, digits, '.', '_', '-').")
    base: BaseConfig = field(default_factory=BaseConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=lambda: DataSettings(path="-"))
    seed: int = _opt(0, "Seed for data order, LoRA init and dropout.", range=SEED)
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass to save memory.")
    fused_lora: bool | None = _opt(None, "One autograd function per adapted layer (base product + LoRA, "
                                         "train/fused_lora.py); --no-fused-lora runs peft's own forward. Default: on "
                                         "the CPU only, where it measured faster (no steady gain on an H100).")
    compile: bool | None = _opt(None, "torch.compile each decoder block's training forward (train/compiled.py): fewer, "
                                      "fused kernels per step, for a one-time compilation (seconds to a minute or two). "
                                      "Evals and generation stay eager. Default: on a GPU only, where it measured "
                                      "faster (on this project's CPU a run did not earn its compilation back).")
    checkpoint_every: int = _opt(0, "Save a resumable checkpoint every N optimizer steps (0: only at the end).",
                                 range=NON_NEGATIVE)
    resume: bool = _opt(False, "Continue from the run's last checkpoint (weights, optimizer, scheduler, step, RNG).")
    log_every: int = _opt(10, "Record the training loss every N steps.", range=POSITIVE)
    runs_dir: str = _opt("runs", "Where checkpoints go: <runs_dir>/<name>/.")
    store_dir: str | None = _opt(None, "Adapter store (default: $ADAPTERS_DIR or adapters/store).", flag="--adapters")

    def __post_init__(self) -> None:
        check_name(self.name)
        check_numbers(self, "")


BASE_FLAGS = {"path": "--base", "quantize": "--quantize", "device": "--device"}


def _leaves(cls, prefix: tuple[str, ...] = ()):
    """(path, field) for every scalar field of a nested config dataclass."""
    for f in fields(cls):
        kind = f.default_factory() if f.default_factory is not MISSING else None
        if is_dataclass(kind):
            yield from _leaves(type(kind), prefix + (f.name,))
        else:
            yield prefix + (f.name,), f


def _flag(path: tuple[str, ...], f) -> str:
    if path[0] == "base":
        return BASE_FLAGS[path[-1]]
    return f.metadata.get("flag") or "--" + path[-1].replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a QLoRA adapter on a 4-bit base and save it, with its card, in the adapter store.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="A YAML file holding a saved TrainConfig; flags override it.")
    parser.add_argument("--no-quant", action="store_true", help="Load the base unquantized (plain LoRA).")
    for path, f in _leaves(TrainConfig):
        help_text = f.metadata.get("help", "")
        dest = ".".join(path)
        if f.type in ("bool", bool, "bool | None"):  # None: decided where it applies (see its help)
            parser.add_argument(_flag(path, f), dest=dest, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        nargs = f.metadata.get("nargs")
        parser.add_argument(
            _flag(path, f), dest=dest, nargs=nargs, type=_scalar_type(f.type), help=help_text, metavar=path[-1].upper()
        )
    return parser


def _scalar_type(annotation: str):
    text = str(annotation)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the --config YAML, then the flags given on the command line."""
    args = vars(build_parser().parse_args(argv))
    data: dict[str, Any] = {}
    if "config" in args:
        data = yaml.safe_load(Path(args.pop("config")).read_text()) or {}
    if args.pop("no_quant", False):
        args["base.quantize"] = False
    for dotted, value in args.items():
        _set(data, dotted.split("."), value)
    return config_from_dict(data)


def _set(tree: dict, path: list[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def config_from_dict(data: dict) -> TrainConfig:
    unknown = set(data) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    parts = {"base": BaseConfig, "lora": LoraSettings, "optim": OptimSettings, "data": DataSettings}
    kwargs = dict(data)
    for key, kind in parts.items():
        section = kwargs.get(key, {})
        bad = set(section) - {f.name for f in fields(kind)}
        if bad:
            raise ValueError(f"unknown keys in config section {key!r}: {sorted(bad)}")
        kwargs[key] = kind(**section)
    return TrainConfig(**kwargs)


def config_to_dict(config: TrainConfig) -> dict:
    return asdict(config)
