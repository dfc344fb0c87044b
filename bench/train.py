"""`make bench-train`: our training loop against a plain Trainer + peft baseline, in one run.

Each side trains in its own child process (so each one's peak memory is its own), three times,
alternating which goes first (figures are the medians; each round is kept), on the same
4-bit demo base, the same examples (a demo task whose examples vary in length), the same LoRA
settings, learning rate, schedule and step count. Writes bench/results/train.json and prints:
  tokens_per_s_ratio   real (non-padding) tokens per second of training: ours / baseline
  peak_memory_ratio    peak resident memory while training (sampled every 5 ms): ours / baseline
  eval loss of each on the same held-out examples (they must agree within 5%)
`--profile` also writes bench/results/train-profile.txt: torch.profiler's top operators for our steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from adapters.base import DEFAULT_BASE, BaseConfig, load_base
from adapters.data import load_examples
from bench.training import BenchSettings, run_ours, run_trainer
from train.data import tokenize

TARGETS = {"tokens_per_s_ratio": ">= 1.3", "peak_memory_ratio": "<= 1.0", "eval_loss_gap": "<= 5%"}


def _items(path: str, tokenizer, limit: int | None):
    examples = load_examples(path)[:limit]
    items, _ = tokenize(examples, tokenizer, 512, "drop", path)
    return items


def worker(args, settings: BenchSettings) -> None:
    """One side of the comparison; prints its stats as one JSON line."""
    torch.manual_seed(settings.seed)
    base = load_base(BaseConfig(args.base))
    train = _items(args.data, base.tokenizer, args.examples)
    evals = _items(args.eval_data, base.tokenizer, 200)
    run = run_ours if args.worker == "ours" else run_trainer
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


def _child(args, which: str, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "bench.train", "--worker", which, "--base", args.base, "--data", args.data,
               "--eval-data", args.eval_data, *extra]
    if args.examples:
        command += ["--examples", str(args.examples)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{which} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--data", default="data/general/train.jsonl")
    parser.add_argument("--eval-data", default="data/general/eval.jsonl")
    parser.add_argument("--examples", type=int, default=None, help="use the first N training examples")
    parser.add_argument("--out", default="bench/results/train.json")
    parser.add_argument("--profile", default=None, metavar="FILE", help="profile our steps into FILE instead")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating which goes first; medians are reported")
    parser.add_argument("--worker", choices=["ours", "trainer"], help=argparse.SUPPRESS)
    for f in fields(BenchSettings):
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool) or f.type == "bool | None":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default) if f.default is not None else int, default=f.default)
    args = parser.parse_args()
    settings = BenchSettings(**{f.name: getattr(args, f.name) for f in fields(BenchSettings)})
    if args.worker or args.profile:
        args.worker = args.worker or "ours"
        return worker(args, settings)

    extra = []
    for f in fields(BenchSettings):
        value, flag = getattr(settings, f.name), f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            extra.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            extra.append(f"{flag}={value}")
    runs: dict[str, list[dict]] = {"ours": [], "trainer": []}
    for round_ in range(args.rounds):  # alternate which goes first: this VM's speed drifts from minute to minute
        for which in ("trainer", "ours") if round_ % 2 == 0 else ("ours", "trainer"):
            runs[which].append(_child(args, which, extra))
    ours, theirs = _median_run(runs["ours"]), _median_run(runs["trainer"])
    results = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "base": args.base,
        "data": args.data,
        "settings": asdict(settings),
        "ours": ours,
        "baseline": theirs,
        "padding_share": {side: round(1 - run["real_tokens"] / run["padded_tokens"], 3)
                          for side, run in (("ours", ours), ("baseline", theirs))},
        "tokens_per_s_ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
        "peak_memory_ratio": round(statistics.median(r["peak_memory_mb"] for r in runs["ours"])
                                   / statistics.median(r["peak_memory_mb"] for r in runs["trainer"]), 3),
        "rounds": [{"ours_tokens_per_s": o["tokens_per_s"], "baseline_tokens_per_s": t["tokens_per_s"],
                    "ours_peak_memory_mb": round(o["peak_memory_mb"], 1), "baseline_peak_memory_mb": round(t["peak_memory_mb"], 1)}
                   for o, t in zip(runs["ours"], runs["trainer"])],
        "eval_loss_gap": round(abs(ours["eval_loss"] - theirs["eval_loss"]) / theirs["eval_loss"], 4),
        "targets": TARGETS,
    }
    results["same_eval_loss_within_5pct"] = results["eval_loss_gap"] <= 0.05
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'':<16}{'ours':>12}{'baseline':>12}")
    for key in ("tokens_per_s", "train_s", "real_tokens", "padded_tokens", "peak_memory_mb", "eval_loss"):
        print(f"{key:<16}{ours[key]:>12.4g}{theirs[key]:>12.4g}")
    for key in ("tokens_per_s_ratio", "peak_memory_ratio", "eval_loss_gap", "same_eval_loss_within_5pct"):
        print(f"{key:<28} {results[key]}  (target {TARGETS.get(key, 'true')})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
