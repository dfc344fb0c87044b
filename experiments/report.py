"""Markdown tables and PNG plots for the sweep, techniques and eval reports."""

from __future__ import annotations

from pathlib import Path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_series(path: Path, x: list, series: dict[str, list[float]], xlabel: str, title: str, log2_x: bool = False) -> None:
    """One panel per series, sharing the x axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4), dpi=100)
    axes = axes if len(series) > 1 else [axes]
    for ax, (name, values) in zip(axes, series.items()):
        ax.plot(x, values, "o-")
        ax.set_xlabel(xlabel)
        ax.set_title(name)
        if log2_x:
            ax.set_xscale("log", base=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bars(path: Path, labels: list[str], series: dict[str, list[float]], title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.6 * len(series), 3.6), dpi=100)
    axes = axes if len(series) > 1 else [axes]
    for ax, (name, values) in zip(axes, series.items()):
        ax.bar(labels, values)
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_heatmap(path: Path, rows: list[str], cols: list[str], values: list[list[float]], title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.6 * len(rows) + 1.8), dpi=100)
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=30)
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xlabel("task (eval set)")
    ax.set_ylabel("model")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="exact match")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
