"""Training configuration: one typed dataclass per concern; a YAML file is a saved instance."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters.base import BaseConfig
from adapters.cli import NON_NEGATIVE, OPEN_UNIT, POSITIVE, SEED, UNIT, Range, add_config_args, apply_overrides, check_numbers
from adapters.cli import config_leaves as _leaves  # noqa: F401  (the tests walk the fields with it)
from adapters.cli import from_dict, load_yamls
from adapters.cli import opt as _opt
from adapters.store import check_name


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


STOP_PROBABILITY_FLOOR = 1e-6
"""The default `stop.min_stop_probability`, set far below chance and far above what a base gives a
token it never emitted. At chance a token gets 1/V, which is above 1e-6 for any vocabulary in use
(Gemma's 256k pieces: 4e-6). Around chance, even where a random-weight head puts the stop token,
a LoRA on the blocks raises it to a stop in a short run. Far below chance the base has learned that
the token never comes: pretraining pushed its output row down together with every other token it
never emitted, and a LoRA, which moves only the hidden state, cannot lift it above that crowd.
The probabilities measured on both kinds of base: docs/training.md#stop-rows."""


@dataclass
class StopSettings:
    """Bases that never stop: the probe of the base's stop tokens before training, and the fix (train/stops.py)."""

    train_stop_rows: bool | None = _opt(
        None, "Train the stop tokens' output rows (and their input rows where the embeddings are tied) beside the "
              "LoRA, with peft's trainable_token_indices (train/stops.py). Default: when the base gives a stop token "
              "less than --min-stop-probability where the training replies end; --no-train-stop-rows never does.")
    min_stop_probability: float = _opt(
        STOP_PROBABILITY_FLOOR, "A stop token whose mean base probability at the reply ends of the probed training "
                                "examples is below this gets its rows trained (unless --no-train-stop-rows).",
        range=OPEN_UNIT)
    probe_examples: int = _opt(64, "Training examples whose reply ends the base is probed at before training.",
                               range=POSITIVE)

    def __post_init__(self) -> None:
        check_numbers(self, "stop")


@dataclass
class TrainConfig:
    name: str = _opt("", "Adapter name in the store (letters, digits, '.', '_', '-').")
    base: BaseConfig = field(default_factory=BaseConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=lambda: DataSettings(path="-"))
    stop: StopSettings = field(default_factory=StopSettings)
    seed: int = _opt(0, "Seed for data order, LoRA init and dropout.", range=SEED)
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass to save memory.")
    fused_lora: bool | None = _opt(None, "One autograd function per adapted layer (base product + LoRA, "
                                         "train/fused_lora.py); --no-fused-lora runs peft's own forward. Default: on "
                                         "the CPU only, where it is the faster path (docs/performance.md).")
    bf16_base_products: bool | None = _opt(None, "With the fused layers: compute the frozen base's products in "
                                                  "bf16 (the rest of the step in the compute dtype); "
                                                  "--no-bf16-base-products keeps them in the compute dtype. Default: "
                                                  "on a CPU with AMX for a float32 base, where it measured faster; off "
                                                  "elsewhere (docs/performance.md).")
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


BASE_FLAGS = {"path": "--base", "quantize": "--quantize", "device": "--device", "compute_dtype": "--compute-dtype"}


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
    parser.add_argument("--config", action="append",
                        help="A YAML file holding a saved TrainConfig; flags override it. Given again, each "
                             "file's keys override the ones before it.")
    parser.add_argument("--no-quant", action="store_true", help="Load the base unquantized (plain LoRA).")
    add_config_args(parser, TrainConfig, flag_of=_flag)
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the --config YAML, then the flags given on the command line."""
    args = vars(build_parser().parse_args(argv))
    data: dict[str, Any] = {}
    if "config" in args:
        data = load_yamls(args.pop("config"))
    if args.pop("no_quant", False):
        args["base.quantize"] = False
    return config_from_dict(apply_overrides(data, args))


def config_from_dict(data: dict) -> TrainConfig:
    return from_dict(TrainConfig, data)


def config_to_dict(config: TrainConfig) -> dict:
    return asdict(config)
