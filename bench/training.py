"""One training run, ours or a baseline, on an already loaded base; shared by bench-train and bench-gpu.

Ours is the loop's own step (`train.loop.train_step`) over its length-grouped micro-batches. The
baselines are what users would write without us, from the plainest to what a user who knows the
field would pick:

- `trainer`: `transformers.Trainer` on a peft model, the examples in a plain list,
  `DataCollatorForSeq2Seq` padding each random batch to its longest example;
- `trainer_grouped`: the same with `train_sampling_strategy="group_by_length"` (transformers 5's
  spelling of `group_by_length=True`): batches of similar length, as ours are;
- `trl_padding_free`: TRL's `SFTTrainer` on the conversations, `assistant_only_loss=True`,
  `padding_free=True`: each batch's examples flattened into one row, kept apart by their
  position ids (on the CPU's SDPA attention transformers builds the block-diagonal mask from
  them; docs/performance.md#training-on-the-cpu);
- `trl_packed`: the same with `packing=True` (best-fit decreasing): the examples packed into rows
  of about a micro-batch's tokens, one row a step.

Every side gets the same base, examples, LoRA settings, learning rate, schedule and step count,
and is scored with the same eval-loss function; TRL's tokens and loss masks are checked to be
ours before it trains.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, get_scheduler

from adapters.base import BaseConfig, LoadedBase
from adapters.chat import FALLBACK_CHAT_TEMPLATE
from adapters.data import Example
from train.checkpoint import Progress
from train.compiled import uncompile_blocks
from train.config import DataSettings, LoraSettings, OptimSettings, TrainConfig
from train.data import IGNORE_INDEX, Tokenized
from train.evaluate import eval_loss
from train.fused_lora import base_products_dtype
from train.loop import attach_lora, count_steps, make_optimizer, prepare_process, run_steps


@dataclass(frozen=True)
class BenchSettings:
    r: int = 16
    alpha: float = 32.0
    lr: float = 2e-4
    micro_batch_size: int = 16
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.05
    seed: int = 0
    gradient_checkpointing: bool = False
    fused_lora: bool | None = None
    """Ours only: train/fused_lora.py's one function per adapted layer (the Trainer runs peft's
    forward); None: our default (on the CPU only)."""
    compile: bool = False
    """Ours only: torch.compile each decoder block's training forward (train/compiled.py)."""
    optimizer: str = "adamw"
    """Ours only (train.loop.make_optimizer); the Trainer runs paged_adamw_8bit on a GPU, as QLoRA's
    recipe does, and its own default, adamw_torch_fused, on the CPU."""
    bf16_base_products: bool | None = None
    """Ours only: the frozen base's products in bf16 (`TrainConfig.bf16_base_products`); None: our
    default (on a CPU with AMX)."""
    compute_dtype: str = "auto"
    """Every side's: the base's compute dtype (`BaseConfig.compute_dtype`); with bfloat16 the
    Trainer-based baselines also run under bf16 autocast (`bf16=True`), as a user who chose bf16
    would set them."""


@dataclass
class RunStats:
    which: str
    steps: int
    real_tokens: int
    """Non-padding tokens fed to the model."""
    padded_tokens: int
    """Every position of every micro-batch, padding included."""
    train_s: float
    peak_memory_mb: float
    eval_loss: float
    base_products: str | None = None
    """Ours: the dtype its fused layers computed the base's products in (None: the compute dtype)."""

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.train_s

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 1)}


def _config(s: BenchSettings, base_path: str) -> TrainConfig:
    return TrainConfig(
        name="bench",
        base=BaseConfig(base_path, compute_dtype=s.compute_dtype),
        lora=LoraSettings(r=s.r, alpha=s.alpha, dropout=0.0),
        optim=OptimSettings(lr=s.lr, warmup_ratio=s.warmup_ratio, epochs=s.epochs, max_steps=s.max_steps,
                            micro_batch_size=s.micro_batch_size, grad_accum=s.grad_accum, optimizer=s.optimizer),
        data=DataSettings(path="-"),
        seed=s.seed,
        gradient_checkpointing=s.gradient_checkpointing,
        fused_lora=s.fused_lora,
        bf16_base_products=s.bf16_base_products,
        compile=s.compile,
    )


def total_steps(n_examples: int, s: BenchSettings) -> int:
    """Optimizer steps for both runs: the Trainer's count (random batches) equals ours."""
    return count_steps(math.ceil(n_examples / s.micro_batch_size), _config(s, "-"))[1]


class PeakMemory:
    """Peak memory while the block runs: allocated GPU memory on CUDA; on the CPU the process's
    resident set, sampled every 5 ms (the lifetime peak, ru_maxrss, would be the base's loading)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes = device, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as statm:
                self.peak_bytes = max(self.peak_bytes, int(statm.read().split()[1]) * page)
            if self._stop.wait(0.005):
                return

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak_bytes / 2**20


@dataclass
class OursRun:
    """Our loop set up on a base: the LoRA model, its optimizer and schedule, ready for steps."""

    config: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps: int
    progress: Progress

    @classmethod
    def prepare(cls, base: LoadedBase, n_examples: int, s: BenchSettings) -> "OursRun":
        torch.manual_seed(s.seed)
        config = _config(s, base.config.path)
        accelerator = Accelerator()
        prepare_process(base.device)  # as train.loop.train does; the Trainer baselines run with glibc's defaults
        model = attach_lora(base.model, config, base.model.config.num_hidden_layers)
        optimizer = make_optimizer(model, config, base.device)
        steps = total_steps(n_examples, s)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=int(s.warmup_ratio * steps), num_training_steps=steps)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        return cls(config, accelerator, model, optimizer, scheduler, steps, Progress())

    def run(self, items: list[Tokenized], pad_id: int, until: int, on_batch=None) -> None:
        """Optimizer steps until `until` steps have been taken in all."""
        run_steps(self.model, items, pad_id, self.optimizer, self.scheduler, self.accelerator, self.config, self.progress,
                  until, on_batch=on_batch)


def run_ours(base: LoadedBase, train: list[Tokenized], evals: list[Tokenized], s: BenchSettings):
    """Our loop's steps; returns (stats, the peft model) so the caller can unload the LoRA layers."""
    ours = OursRun.prepare(base, len(train), s)
    positions, pad_id = [], base.tokenizer.pad_token_id
    with PeakMemory(base.device) as peak:
        start = time.perf_counter()
        ours.run(train, pad_id, ours.steps, on_batch=lambda micro: positions.extend(m["input_ids"].numel() for m in micro))
    train_s = time.perf_counter() - start
    loss = eval_loss(ours.model, evals, pad_id, s.micro_batch_size, base.device)
    model = ours.accelerator.unwrap_model(ours.model)
    products = base_products_dtype(model)
    stats = RunStats("ours", ours.progress.step, ours.progress.tokens, sum(positions), train_s, peak.mb, loss,
                     str(products).removeprefix("torch.") if products else None)
    uncompile_blocks(model)  # the caller unloads the LoRA layers and hands the base to the next run
    return stats, model


def forget_8bit_overrides() -> None:
    """Clear bitsandbytes' process-wide optimizer registry after a Trainer run.

    With an 8-bit optimizer (the baseline's paged_adamw_8bit on a GPU) the Trainer registers every
    nn.Embedding with bitsandbytes' GlobalOptimManager, to keep it in 32 bits; the manager's list
    then holds those modules, and their weights, for the life of the process. On an H100 the 8B
    shape's input embedding (128256 x 4096 bf16, 1.05 GB) outlived its base that way and was
    counted in the next shape's memory."""
    from bitsandbytes.optim import GlobalOptimManager

    GlobalOptimManager.get_instance().initialize()


class _CountingCollator:
    """A collator that counts what it hands the model: real tokens (the attention mask's ones;
    every position of a padding-free row) and every position computed."""

    def __init__(self, inner: Callable):
        self.inner = inner
        self.real = self.padded = 0

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.padded += batch["input_ids"].numel()
        return batch


def _lora_config(s: BenchSettings) -> LoraConfig:
    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _trainer_arguments(s: BenchSettings, steps: int, cuda: bool, out: str) -> dict:
    """The keyword arguments every Trainer-based baseline shares (TrainingArguments and SFTConfig
    take them alike): our schedule, step count, optimizer defaults and precision."""
    return dict(
        output_dir=out, per_device_train_batch_size=s.micro_batch_size, gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.lr, max_steps=steps, lr_scheduler_type="cosine", warmup_steps=int(s.warmup_ratio * steps),
        weight_decay=0.0, max_grad_norm=1.0, seed=s.seed, data_seed=s.seed, save_strategy="no", report_to="none",
        logging_steps=max(1, steps // 10), optim="paged_adamw_8bit" if cuda else "adamw_torch_fused",
        bf16=s.compute_dtype == "bfloat16" or (cuda and s.compute_dtype == "auto"),
        use_cpu=not cuda, gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if s.gradient_checkpointing else None,
        dataloader_num_workers=0, disable_tqdm=True,
    )


def _timed_train(trainer, device: torch.device) -> tuple[float, float]:
    """(seconds, peak MB) of `trainer.train()`; the 8-bit optimizer registry is cleared after it."""
    try:
        with PeakMemory(device) as peak:
            start = time.perf_counter()
            trainer.train()
        return time.perf_counter() - start, peak.mb
    finally:
        forget_8bit_overrides()


TRAINER_SAMPLING = {"trainer": "random", "trainer_grouped": "group_by_length"}
"""The Trainer baselines by name: the sampler (`TrainingArguments.train_sampling_strategy`) each uses."""


def run_trainer(base: LoadedBase, train: list[Tokenized], evals: list[Tokenized], s: BenchSettings,
                which: str = "trainer"):
    """A Trainer + peft baseline with the same settings, `which` one of TRAINER_SAMPLING; returns
    (stats, the peft model)."""
    torch.manual_seed(s.seed)
    cuda = base.device.type == "cuda"
    model = get_peft_model(base.model, _lora_config(s))
    rows = [{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels} for t in train]
    collator = _CountingCollator(DataCollatorForSeq2Seq(base.tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX))
    steps = total_steps(len(train), s)
    with tempfile.TemporaryDirectory() as out:
        # The grouped sampler reads each row's length from its input_ids (no processing class is passed).
        args = TrainingArguments(**_trainer_arguments(s, steps, cuda, out), remove_unused_columns=False,
                                 train_sampling_strategy=TRAINER_SAMPLING[which])
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        train_s, peak_mb = _timed_train(trainer, base.device)
    loss = eval_loss(model, evals, base.tokenizer.pad_token_id, s.micro_batch_size, base.device)
    return RunStats(which, steps, collator.real, collator.padded, train_s, peak_mb, loss), model



MARKED_FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|> ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""adapters.chat.FALLBACK_CHAT_TEMPLATE with `{% generation %}` around each reply, which TRL's
assistant_only_loss reads: the same text, so the same tokens. The space before the reply is inside
the markers because our mask (adapters.chat.encode_chat) counts the word piece that starts at it."""


def training_chat_template(tokenizer) -> str:
    """The chat template that TRL's assistant_only_loss masks with: the base's own when it has
    generation markers, the marked fallback for bases on our fallback template, else TRL's own
    marked version of a template it knows (it raises for one it does not)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE:
        return MARKED_FALLBACK_TEMPLATE
    if has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template
    return get_training_chat_template(tokenizer)


TRL_MODES = {"trl_padding_free": {"padding_free": True}, "trl_packed": {"packing": True, "packing_strategy": "bfd"}}
"""The SFTTrainer baselines by name: the SFTConfig settings that make each one."""


def packed_row_length(train: list[Tokenized], micro_batch_size: int) -> int:
    """Tokens per packed row, a row standing for a micro-batch: the epoch's tokens over its
    micro-batches, and never less than the longest example (bfd would cut it)."""
    lengths = [len(t.input_ids) for t in train]
    return max(max(lengths), math.ceil(sum(lengths) / math.ceil(len(train) / micro_batch_size)))


def check_same_tokens(prepared, train: list[Tokenized], packed: bool) -> None:
    """ValueError unless TRL's prepared dataset holds exactly our examples' tokens and loss labels
    (in our order; packed: the same examples, however the rows hold them)."""
    if not packed:
        for row, item in zip(prepared, train, strict=True):
            if row["input_ids"] != item.input_ids or row["labels"] != item.labels:
                raise ValueError(f"TRL's tokens or loss mask for the example at line {item.line} differ from ours")
        return
    theirs = []
    for row in prepared:
        start = 0
        for n in row["seq_lengths"]:
            theirs.append((tuple(row["input_ids"][start:start + n]), tuple(row["labels"][start:start + n])))
            start += n
    if sorted(theirs) != sorted((tuple(t.input_ids), tuple(t.labels)) for t in train):
        raise ValueError("TRL's packed rows do not hold exactly our examples' tokens and loss masks")


def keep_lora_float32(model) -> int:
    """Put the trainable (LoRA) matrices back in float32; returns how many were cast.

    SFTTrainer casts them to bf16 on a quantized base (QLoRA's recipe) before its optimizer exists;
    every other side trains float32 LoRA matrices (peft's default), so the same LoRA settings
    include their dtype. On a float32 CPU base the bf16 matrices also cost TRL speed (each product
    casts its input): docs/performance.md#training-on-the-cpu."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def _sft_rows(train: list[Tokenized], conversations: list[Example] | None):
    """The dataset SFTTrainer gets: the conversations (TRL tokenizes and masks them) or, without
    them (bench-gpu's synthetic sequences), our token ids and labels as a processed dataset."""
    from datasets import Dataset

    if conversations is None:
        return Dataset.from_list([{"input_ids": t.input_ids, "labels": t.labels} for t in train])
    if [e.line for e in conversations] != [t.line for t in train]:
        raise ValueError("conversations must be the training examples' own, in their order (matched by line)")
    return Dataset.from_list([{"messages": [m.as_dict() for m in e.messages]} for e in conversations])


def run_sft(base: LoadedBase, train: list[Tokenized], evals: list[Tokenized], s: BenchSettings,
            which: str = "trl_padding_free", conversations: list[Example] | None = None):
    """A TRL SFTTrainer + peft baseline, `which` one of TRL_MODES, with assistant-only loss on
    `conversations` (the Examples `train` was tokenized from); returns (stats, the peft model)."""
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(s.seed)
    cuda, packed = base.device.type == "cuda", which == "trl_packed"
    steps = total_steps(len(train), s)
    tokenizer = copy.deepcopy(base.tokenizer)  # SFTTrainer sets its pad token and we set its template
    tokenizer.chat_template = training_chat_template(tokenizer)
    # Padding-free without packing refuses a max_length (it would not be enforced): ours are all
    # kept whole anyway. Packed: one row of about a micro-batch's tokens for each micro-batch.
    shape = ({"max_length": packed_row_length(train, s.micro_batch_size), "per_device_train_batch_size": 1} if packed
             else {"max_length": None})
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(**{**_trainer_arguments(s, steps, cuda, out), **shape}, **TRL_MODES[which],
                           assistant_only_loss=conversations is not None)
        trainer = SFTTrainer(model=base.model, args=config, train_dataset=_sft_rows(train, conversations),
                             processing_class=tokenizer, peft_config=_lora_config(s))
        check_same_tokens(trainer.train_dataset, train, packed)
        keep_lora_float32(trainer.model)
        collator = trainer.data_collator = _CountingCollator(trainer.data_collator)
        train_s, peak_mb = _timed_train(trainer, base.device)
    model = trainer.model
    loss = eval_loss(model, evals, base.tokenizer.pad_token_id, s.micro_batch_size, base.device)
    return RunStats(which, steps, collator.real, collator.padded, train_s, peak_mb, loss), model


def baseline_runner(which: str, conversations: list[Example] | None = None) -> Callable:
    """The run function of the baseline named `which` (TRAINER_SAMPLING's or TRL_MODES' names),
    with run_ours' signature: (base, train, evals, settings) -> (stats, the peft model)."""
    if which in TRAINER_SAMPLING:
        return partial(run_trainer, which=which)
    if which in TRL_MODES:
        return partial(run_sft, which=which, conversations=conversations)
    raise ValueError(f"unknown baseline {which!r}; the baselines are {sorted({**TRAINER_SAMPLING, **TRL_MODES})}")


BASELINES = (*TRAINER_SAMPLING, *TRL_MODES)
