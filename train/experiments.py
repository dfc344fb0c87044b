"""Evidence for choosing rank and technique: `python -m train.experiments sweep|techniques ...`.

sweep       one adapter per (rank, alpha, learning rate), same seed, data and step budget; each is
            a normal adapter in the store. Report: task metric, eval loss, trainable parameters
            and share, time, peak memory, and the smallest setting within one point of the best.
techniques  the same data and budget with QLoRA (4-bit base), LoRA (unquantized base), LoRA on the
            last N blocks, and full fine-tuning of every weight (unquantized); plus forgetting:
            each model's exact match on the other tasks' eval sets and the base's general set,
            against the untouched base at the same precision.

Every flag that is not the experiment's own goes to the training config (`python -m train --help`).
Reports go to reports/<kind>-<name>.md with a PNG beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import PeftModel
import yaml
from transformers import get_scheduler, set_seed

from adapters.base import load_base
from adapters.card import AdapterCard, read_card
from adapters.store import AdapterStore
from train.checkpoint import Progress
from train.config import TrainConfig, config_from_args, config_from_dict, config_to_dict
from train.data import length_grouped_batches, load_examples
from train.evaluate import eval_loss, exact_match
from train.loop import count_steps, peak_memory_mb, prepare_data, run_steps
from train.report import markdown_table, plot_bars, plot_series

log = logging.getLogger(__name__)
ONE_POINT = 0.01
"""One percentage point of exact match: the sweep's tolerance for 'as good as the best'."""


# -- sweep ------------------------------------------------------------------------------

@dataclass
class SweepRow:
    name: str
    r: int
    alpha: float
    lr: float
    metric: float
    base_metric: float
    eval_loss: float
    trainable: int
    share: float
    seconds: float
    peak_memory_mb: float


def sweep_settings(config: TrainConfig, ranks: list[int], alphas: list[float] | None, lrs: list[float] | None) -> list[TrainConfig]:
    """One config per (rank, alpha, lr); alpha defaults to 2·r (the alpha/r scale held fixed)."""
    configs = []
    for r, lr in itertools.product(ranks, lrs or [config.optim.lr]):
        for alpha in alphas or [2.0 * r]:
            name = f"{config.name}-r{r}-a{alpha:g}-lr{lr:g}"
            configs.append(replace(config, name=name, lora=replace(config.lora, r=r, alpha=alpha), optim=replace(config.optim, lr=lr)))
    return configs


def recommend(rows: list[SweepRow]) -> SweepRow:
    """The setting with the fewest trainable parameters whose metric is within one point of the best."""
    best = max(r.metric for r in rows)
    return min((r for r in rows if r.metric >= best - ONE_POINT), key=lambda r: (r.trainable, -r.metric))


def train_in_subprocess(config: TrainConfig) -> AdapterCard:
    """`python -m train` on this config in a child process, so each run's peak memory is its own
    (in one process the CPU's peak RSS only grows); returns the published adapter's card."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config_to_dict(config), handle)
    try:
        done = subprocess.run([sys.executable, "-m", "train", "--config", handle.name], capture_output=True, text=True)
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise RuntimeError(f"training {config.name} failed:\n{done.stderr[-3000:]}")
    return read_card(AdapterStore(config.store_dir).path(config.name))


def run_sweep(config: TrainConfig, ranks: list[int], alphas, lrs, reports: Path) -> Path:
    rows = []
    for setting in sweep_settings(config, ranks, alphas, lrs):
        card = train_in_subprocess(setting)
        rows.append(SweepRow(setting.name, setting.lora.r, setting.lora.alpha, setting.optim.lr, card.metric.adapter,
                             card.metric.base, card.training.eval_loss, card.lora.trainable_params, card.lora.trainable_share,
                             card.training.duration_s, card.training.peak_memory_mb or 0.0))
    return write_sweep_report(config, rows, reports)


def write_sweep_report(config: TrainConfig, rows: list[SweepRow], reports: Path) -> Path:
    reports.mkdir(parents=True, exist_ok=True)
    pick = recommend(rows)
    stem = reports / f"sweep-{config.name}"
    plot_series(stem.with_suffix(".png"), [r.r for r in rows],
                {"exact match": [r.metric for r in rows], "eval loss": [r.eval_loss for r in rows],
                 "trainable parameters": [r.trainable for r in rows]},
                "rank r", f"sweep {config.name}: {config.data.task}", log2_x=len({r.alpha / r.r for r in rows}) == 1 and len({r.lr for r in rows}) == 1)
    table = markdown_table(
        ["adapter", "r", "alpha", "lr", "exact match", "eval loss", "trainable params", "share", "train s", "peak MB"],
        [[r.name, r.r, r.alpha, f"{r.lr:g}", r.metric, r.eval_loss, r.trainable, f"{r.share:.3%}", r.seconds, r.peak_memory_mb] for r in rows],
    )
    budget = f"{config.optim.max_steps} steps" if config.optim.max_steps else f"{config.optim.epochs:g} epochs"
    text = f"""# Rank sweep: {config.name}

Data `{config.data.path}` (task {config.data.task}), base `{config.base.path}`
({'4-bit NF4' if config.base.quantize else 'unquantized'}), seed {config.seed}, the same {budget} for every
setting, micro-batch {config.optim.micro_batch_size}. Exact match on the eval set with the adapter (the base
alone scores {rows[0].base_metric:.3f}); eval loss per target token. Every adapter is in the store.

{table}

![sweep]({stem.with_suffix('.png').name})

**Recommendation: `{pick.name}`** (r={pick.r}, alpha={pick.alpha:g}, lr={pick.lr:g}): the fewest trainable
parameters ({pick.trainable:,}) among the settings within one point ({ONE_POINT:.2f}) of the best exact
match ({max(r.metric for r in rows):.3f}).
"""
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return stem.with_suffix(".md")


# -- techniques -------------------------------------------------------------------------

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
        done = subprocess.run([sys.executable, "-m", "train.experiments", "_full", str(job)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"full fine-tuning failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def _full_job(job_path: Path) -> None:
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


# -- CLI --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    # No abbreviations: --data (a training flag) must not be read as --data-dir.
    parser = argparse.ArgumentParser(prog="python -m train.experiments", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["sweep", "techniques"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--alphas", type=float, nargs="+", default=None, help="default: 2·r for each rank")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="default: the config's --lr")
    parser.add_argument("--last-n", type=int, default=2, help="techniques: blocks adapted by the last-layers technique")
    parser.add_argument("--data-dir", default="data", help="techniques: where the other tasks' eval sets are")
    parser.add_argument("--other-tasks", nargs="*", default=[], help="techniques: only these other sets (default: all)")
    parser.add_argument("--eval-examples", type=int, default=100, help="techniques: examples per other set")
    parser.add_argument("--reports", default="reports")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_full"]:  # the child process of full_in_subprocess
        _full_job(Path(argv[1]))
        return 0
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_from_args(rest)
    if args.kind == "sweep":
        path = run_sweep(config, args.ranks, args.alphas, args.lrs, Path(args.reports))
    else:
        path = run_techniques(config, Path(args.data_dir), args.last_n, args.eval_examples, Path(args.reports), args.other_tasks)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
