"""Training runs from the server (serve/training_runs.py): real `python -m train` children on the
tiny base: validated data, streamed progress, one run at a time, a clean stop, confined paths."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

from adapters.compat import base_shape_from_config
from adapters.data import load_examples
from adapters.store import AdapterNameError, AdapterStore
from serve.registry import AdapterRegistry
from serve.training_runs import (
    RunState,
    TrainingRunError,
    TrainingRuns,
    TrainingRunsSettings,
    safe_stem,
)
from tests.conftest import ANIMAL_COLORS, chat, write_jsonl
from train.__main__ import main as train_cli

ROWS = [chat(f"Color of {animal}?", color) for animal, color in ANIMAL_COLORS.items()]
BAD_LINE = 3
"""The line of `bad_data` whose second message has the wrong role."""


def settings_for(tmp: Path, base: Path, **overrides) -> TrainingRunsSettings:
    """A manager's settings on a private data root, store and runs folder; 8 examples a step, as
    the trainer tests use, so that one epoch of 120 examples is 15 steps."""
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    values = dict(data_roots=(tmp / "data",), store_dir=tmp / "store", base=str(base), runs_dir=tmp / "runs",
                  train_config=None, reports_dir=tmp / "reports", extra_args=("--micro-batch-size", "8"),
                  stop_grace_s=30.0)
    return TrainingRunsSettings(**{**values, **overrides})


def toy_data(root: Path) -> tuple[Path, Path]:
    return write_jsonl(root / "toy" / "train.jsonl", ROWS * 20), write_jsonl(root / "toy" / "eval.jsonl", ROWS)


def bad_data(root: Path) -> Path:
    wrong = {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}
    return write_jsonl(root / "bad" / "train.jsonl", [ROWS[0], ROWS[1], wrong, ROWS[2]])


def staging_entries(store: Path) -> list[Path]:
    folder = store / ".staging"
    return list(folder.iterdir()) if folder.is_dir() else []


# -- datasets and settings, without a run ----------------------------------------------

def test_validate_reports_the_trainers_own_error_with_file_line_and_field(tiny_base, tmp_path, capsys):
    runs = TrainingRuns(settings_for(tmp_path, tiny_base))
    data = bad_data(tmp_path / "data")
    report = runs.validate(data)
    assert not report.ok and report.line == BAD_LINE and report.field == "messages[1].role"
    assert report.error == f"{data}:{BAD_LINE}: field 'messages[1].role': expected role 'assistant' here, got 'user'"
    # `python -m train` prints the same line for the same file.
    assert train_cli(["--name", "x", "--base", str(tiny_base), "--data", str(data),
                      "--adapters", str(tmp_path / "store"), "--runs-dir", str(tmp_path / "cli-runs")]) == 2
    assert f"error: {report.error}" in capsys.readouterr().err
    good, _ = toy_data(tmp_path / "data")
    ok = runs.validate(good)
    assert ok.ok and ok.examples == len(load_examples(good)) == 120 and ok.task == "toy" and ok.error is None
    with pytest.raises(TrainingRunError, match=f":{BAD_LINE}: field 'messages\\[1\\].role'"):
        runs.start("x", data, 8, 16, 5e-3, 1)  # refused before anything runs
    assert not (tmp_path / "runs").exists()


def test_paths_outside_the_data_roots_are_refused_symlinks_included(tiny_base, tmp_path):
    runs = TrainingRuns(settings_for(tmp_path, tiny_base))
    outside, _ = toy_data(tmp_path / "elsewhere")
    (tmp_path / "data" / "link.jsonl").symlink_to(outside)
    for path in (outside, tmp_path / "data" / "link.jsonl", tmp_path / "data" / ".." / "elsewhere" / "toy" / "train.jsonl"):
        report = runs.validate(path)
        assert not report.ok and "outside the data roots" in report.error, path
        with pytest.raises(TrainingRunError, match="outside the data roots"):
            runs.start("x", path, 8, 16, 5e-3, 1)
    inside, evals = toy_data(tmp_path / "data")
    with pytest.raises(TrainingRunError, match="outside the data roots"):
        runs.start("x", inside, 8, 16, 5e-3, 1, eval_data=outside)
    assert runs.datasets() == sorted([evals.resolve(), inside.resolve()])  # the link out is not offered
    assert not (tmp_path / "runs").exists()


def test_bad_names_and_numbers_are_refused_before_anything_starts(tiny_base, tmp_path):
    runs = TrainingRuns(settings_for(tmp_path, tiny_base))
    data, _ = toy_data(tmp_path / "data")
    with pytest.raises(AdapterNameError):
        runs.start("../escape", data, 8, 16, 5e-3, 1)
    for r, alpha, lr, epochs, what in ((0, 16, 5e-3, 1, "r"), (8, -1, 5e-3, 1, "alpha"), (8, 16, math.nan, 1, "lr"),
                                       (8, 16, 5e-3, 0, "epochs"), (2.5, 16, 5e-3, 1, "r")):
        with pytest.raises(TrainingRunError, match=f"^{what} must be"):
            runs.start("x", data, r, alpha, lr, epochs)
    assert not (tmp_path / "runs").exists()


def test_uploads_get_safe_names_never_overwrite_and_are_capped(tiny_base, tmp_path):
    runs = TrainingRuns(settings_for(tmp_path, tiny_base, max_upload_bytes=1000))
    body = (json.dumps(ROWS[0]) + "\n").encode()
    first = runs.save_upload("../../etc/my data.jsonl", body)
    second = runs.save_upload("my data.jsonl", body + body)
    assert first == tmp_path / "data" / "uploads" / "my_data.jsonl"
    assert second == tmp_path / "data" / "uploads" / "my_data-2.jsonl"
    assert first.read_bytes() == body and second.read_bytes() == body + body
    assert runs.validate(second).ok and runs.validate(second).examples == 2
    assert sorted(p.name for p in first.parent.iterdir()) == ["my_data-2.jsonl", "my_data.jsonl"]  # no temporary left
    assert safe_stem(".hidden") == "hidden" and safe_stem("") == "upload"
    with pytest.raises(TrainingRunError, match="limit is 1,000"):
        runs.save_upload("big.jsonl", b"x" * 1001)
    with pytest.raises(TrainingRunError, match="empty"):
        runs.save_upload("empty.jsonl", b"")


def write_sweep(reports: Path, name: str, rows: list[tuple[str, int, float, float, float, int]]) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    keys = ("name", "r", "alpha", "lr", "metric", "trainable")
    (reports / f"sweep-{name}.json").write_text(json.dumps([dict(zip(keys, row)) for row in rows]))


def test_defaults_take_the_best_setting_of_the_matching_sweep_else_the_config(tiny_base, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("lora: {r: 16, alpha: 32}\noptim: {lr: 0.002, epochs: 4}\n")
    runs = TrainingRuns(settings_for(tmp_path, tiny_base, train_config=config))
    # Two settings tie on the metric: the one with fewer trainable parameters wins.
    write_sweep(tmp_path / "reports", "toy", [("toy-r4", 4, 8.0, 1e-3, 0.5, 400), ("toy-r8", 8, 16.0, 2e-3, 0.9, 800),
                                              ("toy-r64", 64, 128.0, 2e-3, 0.9, 6400)])
    picked = runs.defaults(name="toy")
    assert (picked.r, picked.alpha, picked.lr, picked.epochs) == (8, 16.0, 2e-3, 4.0)  # no card left: the config's epochs
    assert "toy-r8" in picked.source
    by_task = runs.defaults(name="other", data=tmp_path / "data" / "toy" / "train.jsonl")  # the folder names the task
    assert by_task.r == 8
    unmatched = runs.defaults(name="other", data=tmp_path / "data" / "other" / "train.jsonl")
    assert (unmatched.r, unmatched.alpha, unmatched.lr, unmatched.epochs) == (16, 32.0, 0.002, 4.0)
    assert unmatched.source == str(config)


# -- real runs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tiny_base, tmp_path_factory):
    """One short run to the end (15 steps), followed by events, with the registry refreshed on finish."""
    tmp = tmp_path_factory.mktemp("finished-run")
    registry = AdapterRegistry(AdapterStore(tmp / "store"), base_shape_from_config(str(tiny_base)))
    finished_calls = []

    def on_finished(run, progress):
        finished_calls.append(progress.state)
        registry.refresh()

    runs = TrainingRuns(settings_for(tmp, tiny_base), on_finished=on_finished)
    data, evals = toy_data(tmp / "data")
    run = runs.start("toy", data, 8, 16.0, 5e-3, 1, eval_data=evals)
    snapshots = list(runs.events(run, interval_s=0.1))
    return runs, run, snapshots, runs.wait(run, timeout_s=60), registry, finished_calls, tmp


@pytest.mark.slow
def test_a_run_streams_its_steps_and_losses_and_publishes_a_servable_adapter(finished):
    runs, run, snapshots, final, registry, finished_calls, tmp = finished
    assert final.state == RunState.FINISHED and final.returncode == 0 and final.error is None, final.log_tail
    steps = [s.step for s in snapshots]
    assert steps == sorted(steps) and snapshots[-1].state == RunState.FINISHED
    assert all(s.state == RunState.RUNNING for s in snapshots[:-1])
    # One epoch of 120 examples, 8 a step: every step's loss, in order, all finite, and they fall.
    assert final.total_steps == 15 and final.step == 15 and final.epoch == pytest.approx(1.0)
    assert [step for step, _ in final.losses] == list(range(1, 16))
    losses = [loss for _, loss in final.losses]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) / 3 < losses[0]
    assert final.evals and "eval_loss" in final.evals[-1] and final.evals[-1]["step"] == 15
    # Published in the store, servable against the base, seen by the registry from on_finished.
    store = AdapterStore(tmp / "store")
    assert final.adapter_dir == str(store.path("toy"))
    assert finished_calls == [RunState.FINISHED]
    assert registry.resolve("toy") is not None and not registry.rejected()
    assert staging_entries(tmp / "store") == []
    assert runs.latest() == run and any("saved" in line for line in final.log_tail)


@pytest.mark.slow
def test_defaults_read_the_sweeps_cards_for_task_and_epochs(finished, tiny_base):
    runs, _, _, _, _, _, tmp = finished
    # The finished run stands in for a sweep's setting: its card names the task (toy) and epochs (1).
    write_sweep(tmp / "reports", "colors", [("toy", 8, 16.0, 5e-3, 1.0, 100)])
    picked = runs.defaults(name="fresh", data=tmp / "data" / "toy" / "eval.jsonl")
    assert (picked.r, picked.alpha, picked.lr, picked.epochs) == (8, 16.0, 5e-3, 1.0)
    assert picked.source.startswith("sweep sweep-colors.json: toy")


def proc_fields(pid: int) -> list[str]:
    """A process's /proc stat fields after the command name (index 16 is its nice value)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()


@pytest.mark.slow
def test_one_run_at_a_time_at_low_priority_and_stop_publishes_nothing(tiny_base, tmp_path):
    runs = TrainingRuns(settings_for(tmp_path, tiny_base))
    data, evals = toy_data(tmp_path / "data")
    run = runs.start("long", data, 8, 16.0, 5e-3, 1000, eval_data=evals)  # 15,000 steps: far longer than the test
    seen = set()
    for progress in runs.events(run, interval_s=0.1):
        assert progress.state == RunState.RUNNING, progress.log_tail
        if progress.step:
            seen.add(progress.step)
        if len(seen) >= 2:
            break
    assert progress.total_steps == 15000
    # Every thread of the trainer runs at the set niceness, on the set thread count.
    tasks = list(Path(f"/proc/{run.pid}/task").iterdir())
    assert {int(proc_fields(int(t.name))[16]) for t in tasks} == {19}
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{run.pid}/environ").read_text().split("\0") if "=" in item)
    assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "1"
    with pytest.raises(TrainingRunError, match="already running \\(long"):
        runs.start("second", data, 8, 16.0, 5e-3, 1)
    stopped = runs.stop(run)
    # Ended by SIGINT itself (Python's exit status for an uncaught KeyboardInterrupt), not by the fallbacks.
    assert stopped.state == RunState.STOPPED and stopped.error is None and stopped.returncode == -signal.SIGINT
    assert stopped.step >= max(seen) and stopped.adapter_dir is None
    assert not AdapterStore(tmp_path / "store").exists("long") and staging_entries(tmp_path / "store") == []
    with pytest.raises(ProcessLookupError):
        os.kill(run.pid, 0)
    assert runs.stop(run).state == RunState.STOPPED  # stopping an ended run changes nothing
    assert runs.progress(run).state == RunState.STOPPED


@pytest.mark.slow
def test_a_failed_run_says_why(tiny_base, tmp_path):
    runs = TrainingRuns(settings_for(tmp_path, tiny_base, extra_args=("--max-length", "8")))
    data, _ = toy_data(tmp_path / "data")
    run = runs.start("fails", data, 8, 16.0, 5e-3, 1)
    final = runs.wait(run, timeout_s=120)
    assert final.state == RunState.FAILED and final.returncode == 2
    assert final.error is not None and "max_length" in final.error, final.log_tail


@pytest.mark.slow
def test_a_trainer_sent_sigterm_unwinds_and_leaves_nothing_half_written(tiny_base, tmp_path):
    """SIGTERM (a supervisor's, or stop's fallback) ends the trainer as Ctrl-C does (the unwinding
    that removes a version being written from the store's staging area), and nothing is published."""
    runs = TrainingRuns(settings_for(tmp_path, tiny_base))
    data, evals = toy_data(tmp_path / "data")
    run = runs.start("terminated", data, 8, 16.0, 5e-3, 1000, eval_data=evals)
    for progress in runs.events(run, interval_s=0.1):
        if progress.step:
            break
    os.kill(run.pid, signal.SIGTERM)
    final = runs.wait(run, timeout_s=60)
    assert final.state == RunState.FAILED and final.returncode == -signal.SIGINT  # unwound as a KeyboardInterrupt
    assert not AdapterStore(tmp_path / "store").exists("terminated") and staging_entries(tmp_path / "store") == []
