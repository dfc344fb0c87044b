"""One training run, ours or the baseline, on an already loaded base; shared by bench-train and bench-gpu.

Ours is the loop's own step (`train.loop.train_step`) over its length-grouped micro-batches. The
baseline is what a user would write without us: `transformers.Trainer` on a peft model, the
examples in a plain list, `DataCollatorForSeq2Seq` padding each random batch to its longest
example. Both get the same base, examples, LoRA settings, learning rate, schedule and step
count, and are scored with the same eval-loss function.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, get_scheduler

from adapters.base import BaseConfig, LoadedBase
from train.checkpoint import Progress
from train.compiled import uncompile_blocks
from train.config import DataSettings, LoraSettings, OptimSettings, TrainConfig
from train.data import Tokenized
from train.evaluate import eval_loss
from train.loop import attach_lora, count_steps, make_optimizer, run_steps


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
    recipe does, and adamw_torch on the CPU."""


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

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.train_s

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 1)}


def _config(s: BenchSettings, base_path: str) -> TrainConfig:
    return TrainConfig(
        name="bench",
        base=BaseConfig(base_path),
        lora=LoraSettings(r=s.r, alpha=s.alpha, dropout=0.0),
        optim=OptimSettings(lr=s.lr, warmup_ratio=s.warmup_ratio, epochs=s.epochs, max_steps=s.max_steps,
                            micro_batch_size=s.micro_batch_size, grad_accum=s.grad_accum, optimizer=s.optimizer),
        data=DataSettings(path="-"),
        seed=s.seed,
        gradient_checkpointing=s.gradient_checkpointing,
        fused_lora=s.fused_lora,
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
    stats = RunStats("ours", ours.progress.step, ours.progress.tokens, sum(positions), train_s, peak.mb, loss)
    model = ours.accelerator.unwrap_model(ours.model)
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
    """The usual seq2seq collator, counting what it hands the model."""

    def __init__(self, tokenizer):
        self.inner = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
        self.real = self.padded = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.real += int(batch["attention_mask"].sum())
        self.padded += batch["input_ids"].numel()
        return batch


def run_trainer(base: LoadedBase, train: list[Tokenized], evals: list[Tokenized], s: BenchSettings):
    """The baseline: Trainer + peft with the same settings; returns (stats, the peft model)."""
    torch.manual_seed(s.seed)
    cuda = base.device.type == "cuda"
    model = get_peft_model(base.model, LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels} for t in train]
    collator = _CountingCollator(base.tokenizer)
    steps = total_steps(len(train), s)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=s.micro_batch_size, gradient_accumulation_steps=s.grad_accum,
            learning_rate=s.lr, max_steps=steps, lr_scheduler_type="cosine", warmup_steps=int(s.warmup_ratio * steps),
            weight_decay=0.0, max_grad_norm=1.0, seed=s.seed, data_seed=s.seed, save_strategy="no", report_to="none",
            logging_steps=max(1, steps // 10), optim="paged_adamw_8bit" if cuda else "adamw_torch", bf16=cuda,
            use_cpu=not cuda, gradient_checkpointing=s.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if s.gradient_checkpointing else None,
            remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        try:
            with PeakMemory(base.device) as peak:
                start = time.perf_counter()
                trainer.train()
            train_s = time.perf_counter() - start
        finally:
            forget_8bit_overrides()
    loss = eval_loss(model, evals, base.tokenizer.pad_token_id, s.micro_batch_size, base.device)
    return RunStats("trainer", steps, collator.real, collator.padded, train_s, peak.mb, loss), model

