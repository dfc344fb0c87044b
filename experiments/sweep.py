"""Rank sweep: one adapter per (rank, alpha, learning rate), same seed, data and step budget; each
is a normal adapter in the store. Report: task metric, eval loss, trainable parameters and share,
time, peak memory, and the smallest setting within one point of the best."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, replace
from pathlib import Path

from experiments.report import markdown_table, plot_series
from experiments.runs import train_in_subprocess
from train.config import TrainConfig

ONE_POINT = 0.01
"""One percentage point of exact match: the sweep's tolerance for 'as good as the best'."""


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
