"""Evidence for choosing rank and technique, and the reports: `python -m experiments COMMAND ...`.

sweep         one adapter per (rank, alpha, learning rate), same seed, data and step budget; each is
              a normal adapter in the store. Report: task metric, eval loss, trainable parameters
              and share, time, peak memory, and the smallest setting within one point of the best.
techniques    the same data and budget with QLoRA (4-bit base), LoRA (unquantized base), LoRA on the
              last N blocks, and full fine-tuning of every weight (unquantized); plus forgetting:
              each model's exact match on the other tasks' eval sets and the base's general set,
              against the untouched base at the same precision.
params-table  the talk's table of trainable parameters by LoRA rank, idealised and exact
              (`python -m experiments params-table --help`).
eval          every servable adapter and the base on every task's eval set, through the serving
              engine (`python -m experiments eval --help`).

For sweep and techniques, every flag that is not the experiment's own goes to the training config
(`python -m train --help`). Reports go to reports/<kind>-<name>.md with a PNG beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from experiments import matrix, params_table
from experiments.sweep import run_sweep
from experiments.techniques import full_job, run_techniques
from train.config import config_from_args

COMMANDS = ["sweep", "techniques", "params-table", "eval"]


def training_parser() -> argparse.ArgumentParser:
    # No abbreviations: --data (a training flag) must not be read as --data-dir.
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=COMMANDS)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    parser.add_argument("--alphas", type=float, nargs="+", default=None, help="default: 2·r for each rank")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="default: the config's --lr")
    parser.add_argument("--last-n", type=int, default=2, help="techniques: blocks adapted by the last-layers technique")
    parser.add_argument("--data-dir", default="data", help="techniques: where the other tasks' eval sets are")
    parser.add_argument("--other-tasks", nargs="*", default=[], help="techniques: only these other sets (default: all)")
    parser.add_argument("--eval-examples", type=int, default=100, help="techniques: examples per other set")
    parser.add_argument("--reports", default="reports")
    return parser


def run_training_experiment(argv: list[str]) -> int:
    """sweep or techniques: the experiment's own flags, the rest for the training config."""
    parser = training_parser()
    args, rest = parser.parse_known_args(argv)
    if args.kind not in ("sweep", "techniques"):
        parser.error(f"{args.kind} must come first: python -m experiments {args.kind} --help")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_from_args(rest)
    if args.kind == "sweep":
        path = run_sweep(config, args.ranks, args.alphas, args.lrs, Path(args.reports))
    else:
        path = run_techniques(config, Path(args.data_dir), args.last_n, args.eval_examples, Path(args.reports), args.other_tasks)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_full"]:  # the child process of techniques.full_in_subprocess
        full_job(Path(argv[1]))
        return 0
    if argv[:1] == ["params-table"]:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return params_table.main(argv[1:])
    if argv[:1] == ["eval"]:
        logging.basicConfig(level=logging.WARNING)
        return matrix.main(argv[1:])
    return run_training_experiment(argv)


if __name__ == "__main__":
    raise SystemExit(main())
