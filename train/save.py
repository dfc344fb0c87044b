"""Write a trained adapter into the store: PEFT files, chat template, card and loss curves."""

from __future__ import annotations

from pathlib import Path

from adapters.card import AdapterCard
from adapters.store import CHAT_TEMPLATE_FILE, AdapterStore


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


def save_adapter(store: AdapterStore, model, tokenizer, card: AdapterCard) -> Path:
    """Publish the adapter atomically under card.name; the previous version is kept."""
    with store.write(card.name) as folder:
        model.save_pretrained(folder, safe_serialization=True)
        (folder / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template)
        card.write(folder)
        plot_losses(card.training.history, folder / "loss.png", f"{card.name} ({card.task})")
    return store.path(card.name)
