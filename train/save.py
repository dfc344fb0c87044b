"""Write a trained adapter into the store: PEFT files, chat template, card and loss curves.

The card gets its golden prompts and examples here, sampled from the eval set (docs/versions.md).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from adapters.card import AdapterCard, ExamplePrompt, GoldenPrompt
from adapters.data import Example
from adapters.store import CHAT_TEMPLATE_FILE, AdapterStore
from train.verify import eval_examples as recorded_eval_examples

log = logging.getLogger(__name__)


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, style in (("train_loss", "-"), ("eval_loss", "o-")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per target token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class PromptSample:
    """How many eval prompts a card carries for the UI and for the promotion gate."""

    golden: int = 16
    """Golden prompts with their expected replies, replayed by the server's promotion gate."""
    examples: int = 4
    """Distinct user prompts shown as clickable examples."""


def with_prompts(card: AdapterCard, eval_examples: Sequence[Example], sample: PromptSample = PromptSample()) -> AdapterCard:
    """The card with `golden` and `examples` drawn from the eval examples: a sample seeded by the
    run's seed, kept in the eval set's order. A card that carries either already is left as it is."""
    if card.golden or card.examples or not eval_examples:
        return card
    order = list(range(len(eval_examples)))
    random.Random(card.training.seed).shuffle(order)
    chosen = sorted(order[: sample.golden])
    golden = [GoldenPrompt([{"role": m.role, "content": m.content} for m in eval_examples[i].prompt],
                           eval_examples[i].reference) for i in chosen]
    return replace(card, golden=golden, examples=_distinct_examples([eval_examples[i] for i in order], sample.examples))


def _distinct_examples(examples: Sequence[Example], count: int) -> list[ExamplePrompt]:
    """The first `count` examples with distinct user prompts, as the chat sends them: the last
    user turn, and the system prompt when the example has one."""
    found: dict[str, ExamplePrompt] = {}
    for example in examples:
        users = [m.content for m in example.prompt if m.role == "user"]
        system = next((m.content for m in example.prompt if m.role == "system"), None)
        if users and users[-1] not in found:
            found[users[-1]] = ExamplePrompt(users[-1], system)
        if len(found) == count:
            break
    return list(found.values())


def _eval_examples(card: AdapterCard, given: Sequence[Example] | None) -> Sequence[Example]:
    if given is not None:
        return given
    try:
        return recorded_eval_examples(card)  # the eval set the card records, read again
    except (OSError, ValueError) as err:  # DataError is a ValueError; a card without prompts still publishes
        log.warning("adapter %r: no golden prompts or examples on its card: its eval set %s cannot be read: %s",
                    card.name, card.dataset.eval_source, err)
        return []


def save_adapter(store: AdapterStore, model, tokenizer, card: AdapterCard, eval_examples: Sequence[Example] | None = None,
                 sample: PromptSample = PromptSample()) -> Path:
    """Publish the adapter atomically under card.name; the previous version is kept.

    The card gets golden prompts and examples from `eval_examples` (None: the eval set the card
    records, read again) unless it carries some already.
    """
    card = with_prompts(card, _eval_examples(card, eval_examples), sample)
    with store.write(card.name) as folder:
        model.save_pretrained(folder, safe_serialization=True)
        (folder / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template)
        card.write(folder)
        plot_losses(card.training.history, folder / "loss.png", f"{card.name} ({card.task})")
    return store.path(card.name)
