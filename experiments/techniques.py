"""Techniques compared: the same data and budget with QLoRA (4-bit base), LoRA (unquantized base),
LoRA on the last N blocks, and full fine-tuning of every weight (unquantized); plus forgetting:
each model's exact match on the other tasks' eval sets and the base's general set, against the
untouched base at the same precision."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel
from transformers import get_scheduler, set_seed

from adapters.base import load_base
from adapters.data import load_examples
from adapters.store import AdapterStore
from experiments.report import markdown_table, plot_bars
from experiments.runs import train_in_subprocess
from train.checkpoint import Progress
from train.config import TrainConfig, config_from_dict, config_to_dict
from train.data import length_grouped_batches
from train.evaluate import eval_loss, exact_match
from train.loop import count_steps, peak_memory_mb, prepare_data, run_steps


@dataclass
class TechniqueRow:
    technique: str
    metric: float
    eval_loss: float
    trainable: int
    share: float
    seconds: float
    peak_memory_mb: float
    others: dict[str, float]
    """Exact match on each other task's eval set (and the base's general set)."""
    reference: dict[str, float]
    """The untouched base at the same precision on the same sets."""

    @property
    def forgetting(self) -> float:
        """Mean drop in exact match on the other sets, against the untouched base (positive = forgot)."""
        return sum(self.reference[t] - self.others[t] for t in self.others) / max(len(self.others), 1)


def other_eval_sets(data_dir: Path, task: str, extra: list[str]) -> dict[str, Path]:
    """Every task's eval set under data_dir except the trained one's."""
    sets = {p.parent.name: p for p in sorted(data_dir.glob("*/eval.jsonl")) if p.parent.name != task}
    return {t: p for t, p in sets.items() if not extra or t in extra}


def score_sets(model, tokenizer, sets: dict[str, Path], device, limit: int) -> dict[str, float]:
    return {task: exact_match(model, tokenizer, load_examples(path)[:limit], device).score for task, path in sets.items()}


def train_full(config: TrainConfig) -> tuple[torch.nn.Module, object, dict]:
    """Full fine-tuning: every weight of the unquantized base trained with AdamW, by the loop's own steps."""
    set_seed(config.seed)
    base = load_base(replace(config.base, quantize=False))
    data = prepare_data(config, base.tokenizer)
    model = base.model
    model.requires_grad_(True)
    accelerator = Accelerator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    lengths = [len(t.input_ids) for t in data.train]
    _, total = count_steps(len(length_grouped_batches(lengths, config.optim.micro_batch_size, 0)), config)
    scheduler = get_scheduler(config.optim.schedule, optimizer, num_warmup_steps=int(config.optim.warmup_ratio * total), num_training_steps=total)
    model, optimizer = accelerator.prepare(model, optimizer)
    pad = base.tokenizer.pad_token_id
    model.train()
    started = time.perf_counter()
    run_steps(model, data.train, pad, optimizer, scheduler, accelerator, config, Progress(), total)
    seconds = time.perf_counter() - started
    model.eval()
    stats = {
        "metric": exact_match(model, base.tokenizer, data.eval_examples, base.device).score,
        "eval_loss": eval_loss(model, data.eval, pad, config.optim.micro_batch_size, base.device),
        "trainable": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "peak_memory_mb": peak_memory_mb(base.device),
    }
    return model, base, stats


def full_in_subprocess(config: TrainConfig, sets: dict[str, Path], limit: int) -> dict:
    """Full fine-tuning and its scores on the other sets, in a child process (its own peak memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"config": config_to_dict(config), "sets": {t: str(p) for t, p in sets.items()}, "limit": limit}))
        done = subprocess.run([sys.executable, "-m", "experiments", "_full", str(job)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"full fine-tuning failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def full_job(job_path: Path) -> None:
    """The child process of full_in_subprocess: train, score, write result.json beside the job."""
    job = json.loads(job_path.read_text())
    model, base, stats = train_full(config_from_dict(job["config"]))
    stats["others"] = score_sets(model, base.tokenizer, {t: Path(p) for t, p in job["sets"].items()}, base.device, job["limit"])
    (job_path.parent / "result.json").write_text(json.dumps(stats))


def technique_configs(config: TrainConfig, last_layers: int) -> dict[str, TrainConfig]:
    quant = replace(config.base, quantize=True)
    plain = replace(config.base, quantize=False)
    return {
        "qlora": replace(config, name=f"{config.name}-qlora", base=quant),
        "lora-unquantized": replace(config, name=f"{config.name}-lora", base=plain),
        f"qlora-last-{last_layers}": replace(config, name=f"{config.name}-last{last_layers}", base=quant,
                                             lora=replace(config.lora, last_layers=last_layers)),
    }


def run_techniques(config: TrainConfig, data_dir: Path, last_layers: int, limit: int, reports: Path, only: list[str]) -> Path:
    sets = other_eval_sets(data_dir, config.data.task, only)
    references: dict[bool, dict[str, float]] = {}

    def reference(quantize: bool) -> dict[str, float]:
        if quantize not in references:
            base = load_base(replace(config.base, quantize=quantize))
            references[quantize] = score_sets(base.model, base.tokenizer, sets, base.device, limit)
        return references[quantize]

    rows = []
    for label, setting in technique_configs(config, last_layers).items():
        card = train_in_subprocess(setting)
        base = load_base(setting.base)
        model = PeftModel.from_pretrained(base.model, str(AdapterStore(setting.store_dir).path(setting.name)))
        others = score_sets(model, base.tokenizer, sets, base.device, limit)
        rows.append(TechniqueRow(label, card.metric.adapter, card.training.eval_loss, card.lora.trainable_params,
                                 card.lora.trainable_share, card.training.duration_s, card.training.peak_memory_mb or 0.0,
                                 others, reference(setting.base.quantize)))
        del model, base
    stats = full_in_subprocess(replace(config, name=f"{config.name}-full"), sets, limit)
    rows.append(TechniqueRow("full fine-tuning", stats["metric"], stats["eval_loss"], stats["trainable"], 1.0, stats["seconds"],
                             stats["peak_memory_mb"], stats["others"], reference(False)))
    return write_techniques_report(config, rows, reports, limit)


def write_techniques_report(config: TrainConfig, rows: list[TechniqueRow], reports: Path, limit: int) -> Path:
    reports.mkdir(parents=True, exist_ok=True)
    stem = reports / f"techniques-{config.name}"
    tasks = list(rows[0].others)
    plot_bars(stem.with_suffix(".png"), [r.technique for r in rows],
              {"exact match (trained task)": [r.metric for r in rows], "forgetting (mean drop, other sets)": [r.forgetting for r in rows]},
              f"techniques on {config.data.task}")
    main = markdown_table(
        ["technique", "exact match", "eval loss", "trainable params", "share", "train s", "peak MB", "forgetting"],
        [[r.technique, r.metric, r.eval_loss, r.trainable, f"{r.share:.2%}", r.seconds, r.peak_memory_mb, r.forgetting] for r in rows],
    )
    detail = markdown_table(
        ["technique", *tasks],
        [["untouched base (4-bit)", *[rows[0].reference[t] for t in tasks]]]
        + [["untouched base (unquantized)", *[rows[-1].reference[t] for t in tasks]]]
        + [[r.technique, *[r.others[t] for t in tasks]] for r in rows],
    )
    budget = f"{config.optim.max_steps} steps" if config.optim.max_steps else f"{config.optim.epochs:g} epochs"
    text = f"""# Techniques compared: {config.name}

Task {config.data.task} (`{config.data.path}`), base `{config.base.path}`, seed {config.seed}, the same {budget},
learning rate {config.optim.lr:g} for every technique (full fine-tuning included), micro-batch
{config.optim.micro_batch_size}. LoRA settings r={config.lora.r}, alpha={config.lora.alpha:g}, all linear layers.
"Unquantized" is float32 on a CPU and bf16 on a GPU. Forgetting is the mean drop in exact match on the
other sets below ({limit} examples each) against the untouched base at the same precision.

{main}

![techniques]({stem.with_suffix('.png').name})

Exact match on the other sets (what each model kept):

{detail}
"""
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps([{**r.__dict__, "forgetting": r.forgetting} for r in rows], indent=2) + "\n")
    return stem.with_suffix(".md")
