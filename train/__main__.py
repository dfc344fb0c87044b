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
    card = result.card
    metric = card.metric
    print(f"saved {result.adapter_dir}")
    if metric:
        print(f"{metric.name}: base {metric.base:.3f} -> adapter {metric.adapter:.3f} on {metric.eval_examples} eval examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
