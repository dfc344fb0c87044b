"""`python -m train ...`: train one QLoRA adapter (see --help)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import TextIO

from adapters.data import DataError
from adapters.store import AdapterNameError
from train.config import build_parser, config_from_args

PROGRESS_HELP = ("Append the run's progress as JSON lines to this file, one event a line: start, each step's loss, "
                 "each eval, saved, or error (docs/training.md#progress-events). Not a training setting: "
                 "it changes nothing the run computes.")


def split_progress_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--progress-file's value, the other arguments). The whole command line is checked first
    against train's parser with the flag added, so --help lists it and a bad flag errors as usual."""
    full = build_parser()
    full.add_argument("--progress-file", help=PROGRESS_HELP)
    full.parse_args(argv)
    only = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    only.add_argument("--progress-file")
    known, rest = only.parse_known_args(argv)
    return known.progress_file, rest


def json_lines_report(handle: TextIO):
    """A train.loop Report writing each event as one flushed JSON line, so a reader sees it at once."""

    def report(event: dict) -> None:
        handle.write(json.dumps(event) + "\n")
        handle.flush()

    return report


def _interrupted(signum, frame) -> None:
    """SIGTERM (a launcher's, or the Train tab's fallback after its SIGINT) unwinds as Ctrl-C
    does, so the version being written is removed from the store's staging area."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    progress_file, argv = split_progress_file(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _interrupted) if main_thread else None
    try:
        with Path(progress_file).open("a") if progress_file else nullcontext() as handle:
            report = json_lines_report(handle) if handle else None
            return run(argv, report)
    finally:
        if main_thread:  # a caller in this process (the tests) keeps its own handler
            signal.signal(signal.SIGTERM, previous)


def run(argv: list[str], report) -> int:
    """Train from the command line; errors the user can fix print one line and return 2."""
    try:
        config = config_from_args(argv)
        from train.loop import ConfigError, no_report, train

        try:
            result = train(config, report=report or no_report)
        except ConfigError as err:
            raise DataError("config", str(err)) from err
    except (DataError, AdapterNameError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        if report:
            report({"event": "error", "message": str(err)})
        return 2
    if not result.published:  # another process of the launch wrote the adapter and says so
        return 0
    card = result.card
    metric = card.metric
    print(f"saved {result.adapter_dir}")
    if metric:
        print(f"{metric.name}: base {metric.base:.3f} -> adapter {metric.adapter:.3f} on {metric.eval_examples} eval examples")
        print(f"stop rate (replies ending on a stop token): base {metric.base_stop_rate:.3f} -> adapter {metric.stop_rate:.3f}")
    if card.stop_rows and card.stop_rows.trained_token_ids:
        print(f"trained the output rows of stop token(s) {card.stop_rows.trained_token_ids} (docs/training.md#stop-rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
