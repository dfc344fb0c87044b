"""`python -m train ...`: train one QLoRA adapter (see --help)."""

from __future__ import annotations

import logging
import sys

from adapters.data import DataError
from adapters.store import AdapterNameError
from train.config import config_from_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(argv)
        from train.loop import ConfigError, train

        try:
            result = train(config)
        except ConfigError as err:
            raise DataError("config", str(err)) from err
    except (DataError, AdapterNameError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
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
