"""Training runs started from the server: `python -m train` in a child process, one at a time, at
low priority and on few threads, with its progress read back from the trainer's JSON lines.

What the Train tab calls (serve/ui.py wraps it; nothing here imports gradio):

    runs = TrainingRuns(TrainingRunsSettings(data_roots=(Path("data"),), store_dir=..., base=...),
                        on_finished=lambda run, progress: service.refresh())
    report = runs.validate("data/sentiment/train.jsonl")      # file:line: field errors, as training gives them
    settings = runs.defaults(name="sentiment", data=report.path)   # the closest sweep's best setting
    run = runs.start("sentiment", report.path, settings.r, settings.alpha, settings.lr, settings.epochs)
    for progress in runs.events(run):                            # RunProgress snapshots until the run ends
        ...
    runs.stop(run)                                               # SIGINT: the trainer unwinds, nothing is published

The run is the same command as `make train`, so a run from the UI and one from the shell give the
same adapter. The store publishes only on success (adapters/store.py), so a stopped or failed run
leaves the live version serving; a finished one is picked up by the registry's watcher (or by the
`on_finished` callback) and goes through whatever gate the service applies to a new version.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from adapters.card import read_card
from adapters.cli import load_yaml
from adapters.data import DataError, read_examples
from adapters.store import AdapterStore, check_name

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN_CONFIG = REPO / "configs" / "demo-adapter.yaml"
UPLOADS = "uploads"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""torch takes its intra-op thread count from OMP_NUM_THREADS when it starts; the BLAS
libraries below it read their own variables."""


class TrainingRunError(ValueError):
    """A run that cannot start or a file that cannot be used, with the reason; the UI shows it as is."""


class RunState(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    """The trainer exited 0: the adapter is published in the store."""
    FAILED = "failed"
    STOPPED = "stopped"
    """Ended by `stop`: nothing was published."""


@dataclass
class TrainingRunsSettings:
    """Where runs may read and write, what they train on, and how gently they share the machine."""

    data_roots: tuple[Path, ...]
    """Folders datasets may be read from (symlinks resolved); uploads go to <first root>/uploads."""
    store_dir: Path
    """The adapter store runs publish into: the one the server serves from."""
    base: str
    """The base model every run trains on: the one the server serves."""
    runs_dir: Path = Path("runs")
    """Runs' logs and progress files (<runs_dir>/<name>/ui-<time>/) and the trainer's checkpoints."""
    train_config: Path | None = DEFAULT_TRAIN_CONFIG
    """A saved TrainConfig each run starts from (`--config`); flags override it. Its r, alpha, lr and
    epochs are the defaults where no sweep matches. None: the trainer's own defaults, and `defaults`
    then needs a sweep."""
    reports_dir: Path = REPO / "reports"
    """Where `make sweep` writes sweep-<name>.json."""
    max_threads: int = 1
    """Intra-op threads of the run: serving keeps the other cores."""
    niceness: int = 19
    """The run's nice value (0-19): the scheduler gives serving's threads the CPU first whenever both want it."""
    python: str = sys.executable
    extra_args: tuple[str, ...] = ()
    """Flags of `python -m train` given to every run after the others (for example --micro-batch-size 8)."""
    max_upload_bytes: int = 64 * 2**20
    stop_grace_s: float = 30.0
    """After SIGINT, how long the trainer gets to unwind before SIGTERM."""
    log_tail_lines: int = 40

    def __post_init__(self) -> None:
        self.data_roots = tuple(Path(r) for r in self.data_roots)
        self.store_dir, self.runs_dir, self.reports_dir = Path(self.store_dir), Path(self.runs_dir), Path(self.reports_dir)
        self.train_config = Path(self.train_config) if self.train_config is not None else None
        self.extra_args = tuple(self.extra_args)
        if not self.data_roots:
            raise ValueError("training_runs.data_roots is empty: name at least one folder datasets may come from")
        missing = [str(r) for r in self.data_roots if not r.is_dir()]
        if missing:
            raise ValueError(f"training_runs.data_roots: not a folder: {', '.join(missing)}")
        if self.max_threads < 1:
            raise ValueError(f"training_runs.max_threads must be >= 1, got {self.max_threads}")
        if not 0 <= self.niceness <= 19:
            raise ValueError(f"training_runs.niceness must be 0-19, got {self.niceness}")
        if self.max_upload_bytes < 1 or self.stop_grace_s <= 0 or self.log_tail_lines < 1:
            raise ValueError("training_runs: max_upload_bytes, stop_grace_s and log_tail_lines must be positive")


@dataclass(frozen=True)
class ValidationReport:
    """A dataset as `python -m train` reads it: how many examples, or the first error, located."""

    path: Path
    """The resolved file (as given when it could not be resolved)."""
    ok: bool
    examples: int = 0
    long_lines: tuple[int, ...] = ()
    """Lines over the trainer's line limit, which training drops unread (1-based)."""
    task: str = ""
    """The task name the card will record: the file's folder name, as the trainer names it."""
    error: str | None = None
    """The whole message, 'file:line: field 'x': what is wrong', as the trainer prints it."""
    line: int | None = None
    field: str | None = None


@dataclass(frozen=True)
class RunSettings:
    """What the Train tab lets a user set, with where the values came from."""

    r: int
    alpha: float
    lr: float
    epochs: float
    source: str
    """'sweep reports/sweep-x.json: <adapter> (exact match 0.98)' or the config file the values are from."""


@dataclass(frozen=True)
class TrainingRun:
    """One started run: what it trains and where its files are."""

    id: str
    name: str
    data: Path
    eval_data: Path | None
    settings: RunSettings
    command: tuple[str, ...]
    log_path: Path
    progress_path: Path
    started_at: float
    """time.time() at the start."""
    pid: int


@dataclass(frozen=True)
class RunProgress:
    """A snapshot of a run, for the page: the loss curve so far, the log's tail, the state."""

    run_id: str
    name: str
    state: RunState
    step: int = 0
    total_steps: int | None = None
    """Known once the trainer has read and tokenized the data."""
    epoch: float = 0.0
    losses: tuple[tuple[int, float], ...] = ()
    """(optimizer step, training loss) for every step so far: the loss curve."""
    evals: tuple[dict, ...] = ()
    """The trainer's eval events: step, eval_loss, and exact_match at the end of each epoch."""
    log_tail: tuple[str, ...] = ()
    error: str | None = None
    """Why a failed run failed: the trainer's error line, or the end of its log."""
    adapter_dir: str | None = None
    """The published adapter's folder, once finished."""
    elapsed_s: float = 0.0
    returncode: int | None = None

    @property
    def done(self) -> bool:
        return self.state != RunState.RUNNING


@dataclass
class _Tracked:
    """The manager's own record of a run: its process and what has been read of its progress file."""

    run: TrainingRun
    process: subprocess.Popen
    ended: threading.Event = field(default_factory=threading.Event)
    """Set once the process has exited."""
    settled: threading.Event = field(default_factory=threading.Event)
    """Set once on_finished (if any) has returned too."""
    stop_requested: bool = False
    ended_at: float | None = None
    offset: int = 0
    partial: bytes = b""
    events: list[dict] = field(default_factory=list)


class TrainingRuns:
    """Starts, follows and stops training runs; at most one runs at a time. Safe to call from several threads.

    on_finished(run, progress) is called from a background thread once a run has published its
    adapter (not for failed or stopped runs), for example to refresh the server's registry.
    """

    def __init__(self, settings: TrainingRunsSettings,
                 on_finished: Callable[[TrainingRun, RunProgress], None] | None = None):
        self.settings = settings
        self.on_finished = on_finished
        self._lock = threading.Lock()
        self._runs: dict[str, _Tracked] = {}
        self._latest: str | None = None

    # -- datasets -----------------------------------------------------------------------
    def confine(self, path: Path | str) -> Path:
        """The file a path names, symlinks resolved, if it lies under a data root; TrainingRunError otherwise.

        A relative path is taken from the current directory, as `python -m train --data` takes it.
        """
        resolved = Path(path).expanduser().resolve()
        roots = [r.resolve() for r in self.settings.data_roots]
        if not any(resolved == root or root in resolved.parents for root in roots):
            raise TrainingRunError(f"{path}: outside the data roots ({', '.join(map(str, roots))}); "
                                   "datasets are read only from there")
        return resolved

    def datasets(self, limit: int = 500) -> list[Path]:
        """The .jsonl files under the data roots (hidden folders skipped), sorted, at most `limit`."""
        found: set[Path] = set()
        for root in (r.resolve() for r in self.settings.data_roots):
            for path in sorted(root.rglob("*.jsonl")):
                if any(part.startswith(".") for part in path.relative_to(root).parts) or not path.is_file():
                    continue
                try:
                    found.add(self.confine(path))
                except TrainingRunError:
                    continue  # a symlink out of the roots is not offered
                if len(found) >= limit:
                    return sorted(found)
        return sorted(found)

    def validate(self, path: Path | str) -> ValidationReport:
        """Check a dataset as the trainer will (adapters.data, lines over the limit dropped): never
        raises for a bad file or path; the report says what is wrong and where."""
        try:
            resolved = self.confine(path)
        except TrainingRunError as err:
            return ValidationReport(Path(path), ok=False, error=str(err))
        try:
            read = read_examples(resolved, on_long="drop")
        except DataError as err:
            return ValidationReport(resolved, ok=False, error=str(err), line=err.line, field=err.field)
        return ValidationReport(resolved, ok=True, examples=len(read.examples), long_lines=tuple(read.long_lines),
                                task=task_of(resolved))

    def save_upload(self, filename: str, data: bytes) -> Path:
        """Write an uploaded dataset to <first data root>/uploads under a safe name; never overwrites:
        a taken name gets a numbered suffix. TrainingRunError for an empty or oversized file."""
        if not data:
            raise TrainingRunError(f"upload {filename!r} is empty")
        if len(data) > self.settings.max_upload_bytes:
            raise TrainingRunError(f"upload {filename!r} is {len(data):,} bytes; the limit is "
                                   f"{self.settings.max_upload_bytes:,}")
        folder = self.settings.data_roots[0] / UPLOADS
        folder.mkdir(parents=True, exist_ok=True)
        self.confine(folder)  # an uploads folder that is a symlink out of the roots is refused
        stem = safe_stem(filename)
        temporary = folder / f".{stem}.{os.getpid()}.{threading.get_ident()}.part"
        temporary.write_bytes(data)
        try:
            return _link_unused(temporary, folder, stem)
        finally:
            temporary.unlink(missing_ok=True)

    # -- settings -----------------------------------------------------------------------
    def defaults(self, name: str | None = None, data: Path | str | None = None) -> RunSettings:
        """r, alpha, lr and epochs for a new run: the best-scoring setting of the closest sweep
        (`make sweep`'s reports), else the train config's. The closest sweep trained on the same
        file, else on the same task, else is named after `name` or the data's task."""
        config = config_defaults(self.settings.train_config) if self.settings.train_config else None
        match = closest_sweep(self.settings.reports_dir, AdapterStore(self.settings.store_dir), name, data,
                              config.epochs if config else None)
        if match is not None:
            return match
        if config is None:
            raise TrainingRunError("no sweep matches and no train_config is set: give r, alpha, lr and epochs")
        return config

    # -- runs ---------------------------------------------------------------------------
    def start(self, name: str, data: Path | str, r: int, alpha: float, lr: float, epochs: float,
              eval_data: Path | str | None = None, max_steps: int | None = None) -> TrainingRun:
        """Launch `python -m train` for one adapter. TrainingRunError (or the store's AdapterNameError)
        before anything starts: a run is already running, a bad name or number, a dataset outside the
        roots or with a bad line."""
        check_name(name)
        settings = RunSettings(*check_numbers(r, alpha, lr, epochs, max_steps), source="given")
        train_file = self.checked_dataset(data)
        eval_file = self.checked_dataset(eval_data) if eval_data is not None else None
        with self._lock:
            running = self._running()
            if running is not None:
                raise TrainingRunError(f"a training run is already running ({running.run.name}, started "
                                       f"{time.strftime('%H:%M:%S', time.localtime(running.run.started_at))}); "
                                       "one at a time: stop it or wait for it to end")
            tracked = self._launch(name, train_file, eval_file, settings, max_steps)
            self._runs[tracked.run.id] = tracked
            self._latest = tracked.run.id
        threading.Thread(target=self._wait, args=(tracked,), name=f"training-run-{name}", daemon=True).start()
        log.info("training run %s started (pid %d): %s", tracked.run.id, tracked.run.pid, " ".join(tracked.run.command))
        return tracked.run

    def checked_dataset(self, path: Path | str) -> Path:
        """The resolved dataset, or TrainingRunError with the report's located error."""
        report = self.validate(path)
        if not report.ok:
            raise TrainingRunError(report.error)
        return report.path

    def command(self, name: str, data: Path, eval_data: Path | None, settings: RunSettings,
                progress_path: Path, max_steps: int | None = None) -> list[str]:
        """The run's command line: `make train`'s flags, the progress file, and `nice` in front."""
        s = self.settings
        argv = [s.python, "-m", "train", *(["--config", str(s.train_config)] if s.train_config else []),
                "--name", name, "--base", s.base, "--data", str(data),
                *(["--eval-data", str(eval_data)] if eval_data else []),
                "--r", str(settings.r), "--alpha", repr(settings.alpha), "--lr", repr(settings.lr),
                "--epochs", repr(settings.epochs), *(["--max-steps", str(max_steps)] if max_steps else []),
                "--adapters", str(s.store_dir), "--runs-dir", str(s.runs_dir),
                "--progress-file", str(progress_path), *s.extra_args]
        nice = shutil.which("nice")
        # `nice` sets the priority before the interpreter starts, so every thread the trainer
        # creates inherits it (Linux keeps a nice value per thread).
        return [nice, "-n", str(s.niceness), *argv] if nice and s.niceness else argv

    def environment(self) -> dict[str, str]:
        """The child's environment: this one's, with the thread limits and the checkout importable."""
        threads = str(self.settings.max_threads)
        env = {**os.environ, **{v: threads for v in THREAD_VARIABLES}, "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def _launch(self, name: str, data: Path, eval_data: Path | None, settings: RunSettings,
                max_steps: int | None) -> _Tracked:
        stamp = time.strftime("%Y%m%d-%H%M%S") + f".{time.time_ns() % 10**9:09d}"
        folder = self.settings.runs_dir / name / f"ui-{stamp}"
        folder.mkdir(parents=True)
        progress_path, log_path = folder / "progress.jsonl", folder / "train.log"
        progress_path.touch()
        argv = self.command(name, data, eval_data, settings, progress_path, max_steps)
        with log_path.open("wb") as log_file:
            # Same session as the server (no setsid): Linux's autogroup scheduling weighs niceness
            # only within one session, and a Ctrl-C at the server's terminal reaches the run too.
            process = subprocess.Popen(argv, cwd=REPO, env=self.environment(), stdin=subprocess.DEVNULL,
                                       stdout=log_file, stderr=subprocess.STDOUT)
        run = TrainingRun(f"{name}-{stamp}", name, data, eval_data, settings, tuple(argv), log_path, progress_path,
                          time.time(), process.pid)
        return _Tracked(run, process)

    def _running(self) -> _Tracked | None:
        return next((t for t in self._runs.values() if not t.ended.is_set()), None)

    def _wait(self, tracked: _Tracked) -> None:
        tracked.process.wait()
        tracked.ended_at = time.time()
        tracked.ended.set()
        progress = self.progress(tracked.run)
        log.info("training run %s ended: %s (exit %s)", tracked.run.id, progress.state, progress.returncode)
        try:
            if progress.state == RunState.FINISHED and self.on_finished is not None:
                self.on_finished(tracked.run, progress)
        except Exception:  # the run itself succeeded; the callback's failure is the caller's to see in the log
            log.exception("on_finished for training run %s failed", tracked.run.id)
        finally:
            tracked.settled.set()

    def latest(self) -> TrainingRun | None:
        """The run started last (running or ended), so a reloaded page can follow it again."""
        with self._lock:
            return self._runs[self._latest].run if self._latest else None

    def progress(self, run: TrainingRun | str) -> RunProgress:
        """A snapshot of the run now: events read so far, the log's tail, the state."""
        tracked = self._tracked(run)
        with self._lock:
            ended = tracked.ended.is_set()
            self._read_events(tracked)
            events = list(tracked.events)
        return snapshot(tracked.run, events, self._state(tracked, ended, events),
                        log_tail(tracked.run.log_path, self.settings.log_tail_lines),
                        (tracked.ended_at or time.time()) - tracked.run.started_at,
                        tracked.process.returncode if ended else None)

    def events(self, run: TrainingRun | str, interval_s: float = 0.5) -> Iterator[RunProgress]:
        """Snapshots of the run, one whenever its step, state or log changed, until (and including)
        the one where it has ended."""
        tracked = self._tracked(run)
        last = None
        while True:
            current = self.progress(run)
            key = (current.step, current.state, len(current.evals), current.log_tail[-1:])
            if key != last:
                last = key
                yield current
            if current.done:
                return
            tracked.ended.wait(interval_s)  # wakes at once when the process exits

    def stop(self, run: TrainingRun | str, timeout_s: float | None = None) -> RunProgress:
        """End a run: SIGINT (the trainer unwinds; a half-written version is removed, nothing is
        published), then SIGTERM after stop_grace_s, then SIGKILL. Returns the final snapshot.
        A run that has already ended is left as it is."""
        tracked = self._tracked(run)
        grace = self.settings.stop_grace_s if timeout_s is None else timeout_s
        with self._lock:
            already = tracked.ended.is_set()
            tracked.stop_requested = tracked.stop_requested or not already
        if already:
            return self.progress(tracked.run)
        steps = [(signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)]
        if ignores_signal(tracked.run.pid, signal.SIGINT):
            # A server started in the background by a non-interactive shell hands its children an
            # ignored SIGINT, and Python then installs no KeyboardInterrupt handler.
            steps = steps[1:]
        for sig, wait_s in steps:
            try:
                tracked.process.send_signal(sig)
            except ProcessLookupError:
                pass  # it ended between the check and the signal
            if tracked.ended.wait(wait_s):
                break
            log.warning("training run %s did not end %.0f s after %s", tracked.run.id, wait_s, sig.name)
        return self.progress(tracked.run)

    def wait(self, run: TrainingRun | str, timeout_s: float | None = None) -> RunProgress:
        """Block until the run has ended and on_finished has returned; TimeoutError after timeout_s."""
        tracked = self._tracked(run)
        if not tracked.settled.wait(timeout_s):
            raise TimeoutError(f"training run {tracked.run.id} still running after {timeout_s} s")
        return self.progress(tracked.run)

    def close(self) -> None:
        """Stop the run still going, if any (the server is shutting down)."""
        with self._lock:
            running = self._running()
        if running is not None:
            self.stop(running.run)

    def _tracked(self, run: TrainingRun | str) -> _Tracked:
        run_id = run.id if isinstance(run, TrainingRun) else run
        with self._lock:
            if run_id not in self._runs:
                raise TrainingRunError(f"no training run {run_id!r} was started here")
            return self._runs[run_id]

    def _read_events(self, tracked: _Tracked) -> None:
        """Append the progress file's new complete lines to the run's events (a line still being
        written waits for its newline)."""
        try:
            with tracked.run.progress_path.open("rb") as handle:
                handle.seek(tracked.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        tracked.offset += len(chunk)
        *lines, tracked.partial = (tracked.partial + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                tracked.events.append(json.loads(line))

    @staticmethod
    def _state(tracked: _Tracked, ended: bool, events: list[dict]) -> RunState:
        if not ended:
            return RunState.RUNNING
        if tracked.process.returncode == 0:
            # A stop that came after the adapter was published does not unpublish it.
            return RunState.FINISHED
        return RunState.STOPPED if tracked.stop_requested else RunState.FAILED


def snapshot(run: TrainingRun, events: list[dict], state: RunState, tail: list[str], elapsed_s: float,
             returncode: int | None) -> RunProgress:
    """A RunProgress from the trainer's events (train/__main__.py --progress-file)."""
    steps = [e for e in events if e.get("event") == "step"]
    totals = [e["total_steps"] for e in events if "total_steps" in e]
    saved = next((e for e in events if e.get("event") == "saved"), None)
    error = None
    if state == RunState.FAILED:
        error = next((e["message"] for e in events if e.get("event") == "error"), None) or failure_text(tail, returncode)
    return RunProgress(
        run_id=run.id, name=run.name, state=state,
        step=steps[-1]["step"] if steps else 0,
        total_steps=totals[-1] if totals else None,
        epoch=steps[-1]["epoch"] if steps else 0.0,
        losses=tuple((e["step"], e["loss"]) for e in steps),
        evals=tuple(e for e in events if e.get("event") == "eval"),
        log_tail=tuple(tail), error=error,
        adapter_dir=saved["adapter_dir"] if saved else None,
        elapsed_s=round(elapsed_s, 2), returncode=returncode,
    )


def ignores_signal(pid: int, sig: signal.Signals) -> bool:
    """Whether a process ignores a signal (Linux /proc/<pid>/status SigIgn); False where unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((line.split(":", 1)[1] for line in status.splitlines() if line.startswith("SigIgn:")), "0")
    return bool(int(mask.strip(), 16) >> (sig - 1) & 1)


def failure_text(tail: list[str], returncode: int | None) -> str:
    """The last lines of a failed run's log (a traceback's end names the exception)."""
    lines = [line for line in tail if line.strip()]
    return f"the trainer exited with status {returncode}" + (":\n" + "\n".join(lines[-5:]) if lines else "")


def log_tail(path: Path, lines: int, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `lines` lines of a log; a progress bar's carriage-return redraws count as lines,
    so its latest state shows."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - max_bytes))
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    parts = [p.rstrip() for p in re.split(r"[\r\n]", text)]
    return [p for p in parts if p][-lines:]


def task_of(path: Path) -> str:
    """The task name the trainer records for a data file: its folder's name (or its stem)."""
    return path.parent.name or path.stem


def safe_stem(filename: str) -> str:
    """An upload's name reduced to letters, digits, '.', '_' and '-', without folders or a leading dot."""
    stem = Path(str(filename).replace("\\", "/")).name
    stem = stem[: -len(".jsonl")] if stem.lower().endswith(".jsonl") else stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip("._-")[:64]
    return stem or "upload"


def _link_unused(temporary: Path, folder: Path, stem: str, attempts: int = 1000) -> Path:
    """Give a written file the first free name <stem>.jsonl, <stem>-2.jsonl, ...; a hard link
    never replaces a file that exists, so two uploads of one name both keep theirs."""
    for i in range(1, attempts + 1):
        target = folder / (f"{stem}.jsonl" if i == 1 else f"{stem}-{i}.jsonl")
        try:
            os.link(temporary, target)
        except FileExistsError:
            continue
        return target
    raise TrainingRunError(f"{folder}: {attempts} uploads named {stem!r} already; rename the file")


def check_numbers(r, alpha, lr, epochs, max_steps) -> tuple[int, float, float, float]:
    """The run's settings as numbers, or TrainingRunError naming the one that is wrong."""
    if isinstance(r, bool) or not isinstance(r, (int, float)) or r != int(r) or r < 1:
        raise TrainingRunError(f"r must be a whole number >= 1, got {r!r}")
    named = {"alpha": alpha, "lr": lr, "epochs": epochs}
    for key, value in named.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise TrainingRunError(f"{key} must be a number > 0, got {value!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise TrainingRunError(f"max_steps must be a whole number >= 1, got {max_steps!r}")
    return int(r), float(alpha), float(lr), float(epochs)


def config_defaults(path: Path) -> RunSettings:
    """r, alpha, lr and epochs from a saved TrainConfig; TrainingRunError naming a missing key."""
    data = load_yaml(path)
    try:
        lora, optim = data["lora"], data["optim"]
        return RunSettings(int(lora["r"]), float(lora["alpha"]), float(optim["lr"]), float(optim["epochs"]), str(path))
    except (KeyError, TypeError) as err:
        raise TrainingRunError(f"{path}: lora.r, lora.alpha, optim.lr and optim.epochs are needed for the defaults "
                               f"(missing {err})") from None


@dataclass(frozen=True)
class SweepRow:
    """One setting of a `make sweep` report (reports/sweep-<name>.json), with its adapter's card where it still is."""

    report: Path
    name: str
    r: int
    alpha: float
    lr: float
    metric: float
    trainable: int
    task: str | None
    data: str | None
    epochs: float | None


def read_sweeps(reports: Path, store: AdapterStore) -> list[list[SweepRow]]:
    """Every sweep report's rows; a report that does not parse is logged and left out."""
    sweeps = []
    for report in sorted(Path(reports).glob("sweep-*.json")):
        try:
            rows = [sweep_row(report, row, store) for row in json.loads(report.read_text())]
        except (ValueError, KeyError, TypeError) as err:
            log.warning("sweep report %s left out of the defaults: %s", report, err)
            continue
        if rows:
            sweeps.append(rows)
    return sweeps


def sweep_row(report: Path, row: dict, store: AdapterStore) -> SweepRow:
    task = data = epochs = None
    try:
        folder = store.path(row["name"])
        if folder.is_dir():
            card = read_card(folder)
            task, data, epochs = card.task, card.dataset.path, card.training.epochs
    except ValueError:  # a row's adapter with a name the store refuses, or a card that no longer reads
        pass
    return SweepRow(report, row["name"], int(row["r"]), float(row["alpha"]), float(row["lr"]), float(row["metric"]),
                    int(row["trainable"]), task, data, epochs)


def closest_sweep(reports: Path, store: AdapterStore, name: str | None, data: Path | str | None,
                  fallback_epochs: float | None = None) -> RunSettings | None:
    """The best-scoring row (fewest trainable parameters among equal scores) of the closest sweep:
    one trained on the same file, else on the same task (by its adapters' cards), else one named
    after `name` or the task; None if none is. Epochs come from the row's card (a sweep gives every
    setting the same budget, so any card of the sweep will do), else `fallback_epochs`."""
    sweeps = read_sweeps(reports, store)
    wanted = Path(data).resolve() if data else None
    task = task_of(wanted) if wanted else None

    def same_file(rows: list[SweepRow]) -> bool:
        return wanted is not None and any(r.data and (REPO / r.data).resolve() == wanted for r in rows)

    def same_task(rows: list[SweepRow]) -> bool:
        return task is not None and any(r.task == task for r in rows)

    def named(rows: list[SweepRow]) -> bool:
        return rows[0].report.stem in {f"sweep-{n}" for n in (name, task) if n}

    for matches in (same_file, same_task, named):
        found = [rows for rows in sweeps if matches(rows)]
        if found:
            best = max((r for rows in found for r in rows), key=lambda r: (r.metric, -r.trainable))
            epochs = best.epochs if best.epochs is not None else _sweep_epochs(found)
            source = f"sweep {best.report.name}: {best.name} (exact match {best.metric:.3f})"
            if epochs is None:
                if fallback_epochs is None:
                    continue
                epochs, source = fallback_epochs, source + "; epochs from the train config (no card of the sweep is left)"
            return RunSettings(best.r, best.alpha, best.lr, epochs, source)
    return None


def _sweep_epochs(sweeps: list[list[SweepRow]]) -> float | None:
    """A sweep runs every setting for the same budget: any row's card that is still there gives it."""
    return next((r.epochs for rows in sweeps for r in rows if r.epochs is not None), None)
