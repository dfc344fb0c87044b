"""Reload saved adapters with plain peft on a freshly loaded 4-bit base and recompute their card's metric.

    python -m train.verify [NAME ...]     (default: every adapter in the store)
"""

from __future__ import annotations

import argparse
import sys

from peft import PeftModel

from adapters.base import BaseConfig, load_base
from adapters.card import AdapterCard, read_card
from adapters.data import Example, load_examples
from adapters.store import AdapterStore
from train.data import split_eval
from train.evaluate import exact_match

HELD_OUT = "held-out fraction "


def eval_examples(card: AdapterCard) -> list[Example]:
    """The eval set the card was scored on: its eval file, or the same seeded held-out split."""
    source = card.dataset.eval_source
    if source.startswith(HELD_OUT):
        fraction = float(source[len(HELD_OUT):].split(" of ", 1)[0])
        examples = split_eval(load_examples(card.dataset.path), fraction, card.training.seed)[1]
    else:
        examples = load_examples(source)
    return examples[: card.dataset.eval_examples]


def verify(store: AdapterStore, name: str) -> tuple[float, float]:
    """(the card's adapter metric, the metric recomputed with plain peft)."""
    folder = store.path(name)
    card = read_card(folder)
    base = load_base(BaseConfig(card.base.path, quantize=card.base.quantization != "none"))
    model = PeftModel.from_pretrained(base.model, str(folder))
    score = exact_match(model, base.tokenizer, eval_examples(card), base.device).score
    return card.metric.adapter, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*")
    parser.add_argument("--adapters", default=None, help="Adapter store (default: $ADAPTERS_DIR or adapters/store).")
    args = parser.parse_args(argv)
    store = AdapterStore(args.adapters)
    failed = 0
    for name in args.names or store.names():
        card_score, score = verify(store, name)
        same = abs(card_score - score) < 1e-9
        failed += not same
        print(f"{name}: card exact match {card_score:.3f}, plain peft reload {score:.3f} {'ok' if same else 'MISMATCH'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
