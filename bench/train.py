"""`make bench-train`: our training loop against every baseline of bench/training.py, in one run.

The baselines: a plain Trainer + peft (random batches), the Trainer with length-grouped batches,
and TRL's SFTTrainer with assistant-only loss, padding-free and packed. Each side trains in its
own child process (so each one's peak memory is its own), three times, rotating which goes first
(figures are the medians; each round is kept), on the same 4-bit demo base, the same examples (a
demo task whose examples vary in length), the same LoRA settings, learning rate, schedule and
step count. Writes bench/results/train.json and prints each side's figures and, against the
fastest baseline (by median tokens/s):
  tokens_per_s_ratio   real (non-padding) tokens per second of training: ours / fastest
  peak_memory_ratio    peak resident memory while training (sampled every 5 ms): ours / fastest
  eval_loss_gap        |ours - fastest| / fastest on the same held-out examples (within 1%)
`--quick` trains a few steps on the first examples, for the test that keeps every side running.
`--profile` also writes bench/results/train-profile.txt: torch.profiler's top operators for our steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from adapters.base import DEFAULT_BASE, BaseConfig, load_base
from adapters.data import load_examples
from bench.machine import describe
from bench.training import BASELINES, BenchSettings, baseline_runner, run_ours
from train.data import tokenize

TARGETS = {"tokens_per_s_ratio": ">= 1.3", "peak_memory_ratio": "<= 1.0", "eval_loss_gap": "<= 1%"}
"""Ours against the fastest baseline (issue 25)."""
QUICK = {"eval_examples": 16, "rounds": 1, "max_steps": None, "epochs": 1.0}
"""--quick: one round of one epoch of two micro-batches' examples (so two steps in which every
side sees the same examples), scored on a small eval."""


def _items(path: str, tokenizer, limit: int | None):
    """The first `limit` examples of a file, tokenized (over-long ones dropped), and the examples kept."""
    examples = load_examples(path)[:limit or None]
    items, _ = tokenize(examples, tokenizer, 512, "drop", path)
    kept = {item.line for item in items}
    return items, [e for e in examples if e.line in kept]


def worker(args, settings: BenchSettings) -> None:
    """One side of the comparison; prints its stats as one JSON line."""
    torch.manual_seed(settings.seed)
    base = load_base(BaseConfig(args.base, compute_dtype=settings.compute_dtype))
    train, conversations = _items(args.data, base.tokenizer, args.examples)
    evals, _ = _items(args.eval_data, base.tokenizer, args.eval_examples)
    run = run_ours if args.worker == "ours" else baseline_runner(args.worker, conversations)
    if args.profile:
        _profile(base, train, evals, settings, args.profile)
        return
    stats, _ = run(base, train, evals, settings)
    print(json.dumps(stats.as_dict()))


def _profile(base, train, evals, settings: BenchSettings, out: str) -> None:
    """Where our step's time goes: a few steps under torch.profiler, operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    few = BenchSettings(**{**asdict(settings), "max_steps": 12})
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_ours(base, train, evals, few)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    Path(out).write_text(table + "\n")
    print(table)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


VARIANTS = {"ours_bf16_products": ["--bf16-base-products"], "ours_float32_products": ["--no-bf16-base-products"]}
"""Ours with a setting other than its default, run as extra sides (`--variants`): reported beside
ours, never a baseline. Which of the two is ours' default depends on the CPU (`card` of each run:
`training.base_products`)."""


def _child(args, which: str, extra: list[str]) -> dict:
    worker, flags = ("ours", VARIANTS[which]) if which in VARIANTS else (which, [])
    command = [sys.executable, "-m", "bench.train", "--worker", worker, "--base", args.base, "--data", args.data,
               "--eval-data", args.eval_data, "--examples", str(args.examples), "--eval-examples", str(args.eval_examples),
               *extra, *flags]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{which} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _round_order(sides: list[str], round_: int) -> list[str]:
    """Round r starts with side r (mod the count): this VM's speed drifts from minute to minute,
    so no side always runs first or last."""
    shift = round_ % len(sides)
    return sides[shift:] + sides[:shift]


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--data", default="data/general/train.jsonl")
    parser.add_argument("--eval-data", default="data/general/eval.jsonl")
    # Half the general task's 3,000: five sides three times stay within minutes, and each side
    # still takes 94 steps over the same spread of lengths.
    parser.add_argument("--examples", type=int, default=1500, help="use the first N training examples (0: all)")
    parser.add_argument("--eval-examples", type=int, default=200, help="score on the first N eval examples")
    parser.add_argument("--out", default=None, help="default: bench/results/train.json, or train-<dtype>.json for another --compute-dtype")
    parser.add_argument("--profile", default=None, metavar="FILE", help="profile our steps into FILE instead")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, rotating which goes first; medians are reported")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help=f"comma-separated, of {', '.join(BASELINES)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one round of one epoch of the first 2 x micro-batch-size examples (two steps)")
    parser.add_argument("--variants", default="", help=f"comma-separated extra sides of ours, of {', '.join(VARIANTS)}")
    parser.add_argument("--worker", choices=["ours", *BASELINES], help=argparse.SUPPRESS)
    for f in fields(BenchSettings):
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool) or f.type == "bool | None":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default) if f.default is not None else int, default=f.default)
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.examples = 2 * args.micro_batch_size
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(args.variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(set(args.variants) - set(VARIANTS))}; choose from {', '.join(VARIANTS)}")
    unknown = sorted(set(args.baselines) - set(BASELINES))
    if unknown or not args.baselines:
        parser.error(f"--baselines: unknown {unknown}; choose from {', '.join(BASELINES)}")
    return args


def _settings_flags(settings: BenchSettings) -> list[str]:
    """The settings as the child's command-line flags."""
    extra = []
    for f in fields(BenchSettings):
        value, flag = getattr(settings, f.name), f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            extra.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            extra.append(f"{flag}={value}")
    return extra


def compare(runs: dict[str, list[dict]]) -> dict:
    """Ours against the fastest baseline (by median tokens/s): the ratios the targets name, and
    each side's median run and padding share."""
    medians = {side: _median_run(side_runs) for side, side_runs in runs.items()}
    baselines = [side for side in runs if side != "ours" and side not in VARIANTS]
    fastest = max(baselines, key=lambda side: medians[side]["tokens_per_s"])
    ours, theirs = medians["ours"], medians[fastest]
    peak = {side: statistics.median(r["peak_memory_mb"] for r in side_runs) for side, side_runs in runs.items()}
    gap = abs(ours["eval_loss"] - theirs["eval_loss"]) / theirs["eval_loss"]
    variants = {side: {"tokens_per_s_ratio": round(medians[side]["tokens_per_s"] / theirs["tokens_per_s"], 2),
                       "peak_memory_ratio": round(peak[side] / peak[fastest], 3),
                       "eval_loss_gap": round(abs(medians[side]["eval_loss"] - theirs["eval_loss"]) / theirs["eval_loss"], 4)}
                for side in runs if side in VARIANTS}
    return {
        "variants_vs_fastest": variants,
        "sides": medians,
        "fastest_baseline": fastest,
        "padding_share": {side: round(1 - run["real_tokens"] / run["padded_tokens"], 3) for side, run in medians.items()},
        "tokens_per_s_ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
        "tokens_per_s_ratio_by_baseline": {side: round(ours["tokens_per_s"] / medians[side]["tokens_per_s"], 2)
                                           for side in baselines},
        "peak_memory_ratio": round(peak["ours"] / peak[fastest], 3),
        "eval_loss_gap": round(gap, 4),
        "same_eval_loss_within_1pct": gap <= 0.01,
    }


def _print(results: dict) -> None:
    sides = list(results["sides"])
    print(f"{'':<16}" + "".join(f"{side:>20}" for side in sides))
    for key in ("tokens_per_s", "train_s", "real_tokens", "padded_tokens", "peak_memory_mb", "eval_loss"):
        print(f"{key:<16}" + "".join(f"{results['sides'][side][key]:>20.5g}" for side in sides))
    print(f"fastest baseline: {results['fastest_baseline']}")
    for key in ("tokens_per_s_ratio", "peak_memory_ratio", "eval_loss_gap", "same_eval_loss_within_1pct"):
        print(f"{key:<28} {results[key]}  (target {TARGETS.get(key, 'true')})")
    for side, figures in results["variants_vs_fastest"].items():
        print(f"{side}: {figures}")


def main() -> None:
    args = _parse_args()
    settings = BenchSettings(**{f.name: getattr(args, f.name) for f in fields(BenchSettings)})
    if args.worker or args.profile:
        args.worker = args.worker or "ours"
        return worker(args, settings)

    extra = _settings_flags(settings)
    sides = ["ours", *args.variants, *args.baselines]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    order = []
    for round_ in range(args.rounds):
        order.append(_round_order(sides, round_))
        for which in order[-1]:
            runs[which].append(_child(args, which, extra))
    results = {
        "machine": f"{describe()}, torch {torch.__version__}",
        "base": args.base,
        "data": args.data,
        "examples": args.examples,
        "settings": asdict(settings),
        **compare(runs),
        "rounds": [{"order": sides_in_order, **{side: {"tokens_per_s": runs[side][i]["tokens_per_s"],
                                                      "peak_memory_mb": round(runs[side][i]["peak_memory_mb"], 1)}
                                               for side in sides}}
                   for i, sides_in_order in enumerate(order)],
        "targets": TARGETS,
    }
    args.out = args.out or f"bench/results/train{'' if settings.compute_dtype == 'auto' else '-' + settings.compute_dtype}.json"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    _print(results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
