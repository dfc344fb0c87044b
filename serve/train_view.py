"""What the Train tab shows, without gradio: datasets to pick, a dataset's validation, the run's
settings and its progress, over `serve.training_runs.TrainingRuns` (which starts and follows the run).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from serve.training_runs import RunProgress, RunSettings, RunState, TrainingRunError, TrainingRuns, ValidationReport

FALLBACK = RunSettings(r=8, alpha=16.0, lr=2e-3, epochs=4.0, source="the Train tab's own defaults")
"""Shown when no sweep matches and the server has no train config: TrainingRuns.defaults refuses then."""


def dataset_choices(runs: TrainingRuns) -> list[tuple[str, str]]:
    """The .jsonl files under the data roots as (label, path) pairs; the label is the path from its root."""
    roots = [r.resolve() for r in runs.settings.data_roots]
    choices = []
    for path in runs.datasets():
        root = next((r for r in roots if r == path or r in path.parents), None)
        label = f"{root.name}/{path.relative_to(root)}" if root else str(path)
        choices.append((label, str(path)))
    return choices


def validation_text(report: ValidationReport) -> str:
    """Markdown: the example count and task, or the first error with its file, line and field."""
    if not report.ok:
        where = f" (line {report.line}" + (f", field `{report.field}`" if report.field else "") + ")" if report.line else ""
        return f"**Not usable{where}:** `{html.escape(report.error or 'unknown error')}`"
    dropped = f"; {len(report.long_lines)} lines over the length limit are dropped" if report.long_lines else ""
    return f"**{report.examples} examples** for task `{report.task}` in `{report.path.name}`{dropped}."


def settings_for(runs: TrainingRuns, name: str | None, report: ValidationReport) -> RunSettings:
    """The run's defaults: the closest sweep's best setting, else the train config's, else FALLBACK."""
    try:
        return runs.defaults(name=name or report.task or None, data=report.path if report.ok else None)
    except TrainingRunError:
        return FALLBACK


def progress_text(progress: RunProgress) -> str:
    """Markdown: the run's state, step, epoch, last loss and, when it failed, why."""
    total = f"/{progress.total_steps}" if progress.total_steps else ""
    loss = f", loss {progress.losses[-1][1]:.4f}" if progress.losses else ""
    line = (f"**{progress.name}: {progress.state}** step {progress.step}{total}, epoch {progress.epoch:.2f}{loss}, "
            f"{progress.elapsed_s:.0f} s")
    if progress.evals:
        last = progress.evals[-1]
        labels = {"eval_loss": "eval loss", "exact_match": "exact match"}
        line += "".join(f", {label} {last[key]:.3f}" for key, label in labels.items() if isinstance(last.get(key), (int, float)))
    if progress.state == RunState.FAILED and progress.error:
        line += f"\n\n```\n{progress.error}\n```"
    if progress.state == RunState.FINISHED:
        line += f"\n\nPublished to `{Path(progress.adapter_dir).name if progress.adapter_dir else '?'}`: " \
                "it is in the Chat and Compare pickers now."
    if progress.state == RunState.STOPPED:
        line += "\n\nStopped: nothing was published; the live version keeps serving."
    return line


def loss_rows(progress: RunProgress) -> list[dict]:
    """The loss curve's points for a line plot: one {'step', 'loss'} per optimizer step."""
    return [{"step": step, "loss": loss} for step, loss in progress.losses]


@dataclass(frozen=True)
class DatasetView:
    """What picking a dataset shows: its validation, the adapter name to suggest, the run's defaults."""

    validation: str
    name: str
    settings: RunSettings
    source: str


def dataset_view(runs: TrainingRuns, path: str | Path, current_name: str) -> DatasetView:
    """Validate the dataset and find its defaults; the name typed is kept, else the task's is suggested."""
    report = runs.validate(path)
    defaults = settings_for(runs, current_name, report)
    return DatasetView(validation_text(report), current_name or (report.task if report.ok else ""), defaults,
                       f"<small>settings from {html.escape(defaults.source)}</small>")
