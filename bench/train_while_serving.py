"""`make bench-train-serving`: serving's batch-1 latency without a training run and with one going,
started as the Train tab starts it (serve/training_runs.py: low priority, few threads).

One request at a time to one adapter through the decode loop, as a server serves it, in three
phases of --requests each: alone, while a training run is in its steps, alone again after the
run is stopped (the two alone phases bracket the machine's drift). Per request: seconds from
submission to the last token; per token: the mean gap between tokens after the first (decode
only). Prints medians and p90s and the ratios (with training / without), and writes
bench/results/train-while-serving.json with the machine named.

The run trains into a scratch store that is deleted afterwards: nothing is published where the
server serves from. The whole bench is bounded by --budget-s (about two minutes by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from adapters import AdapterStore, BaseConfig, BaseShape, Message, load_base
from adapters.base import DEFAULT_BASE
from bench import machine
from bench.serve import PROMPTS
from serve.engine import ChatRequest, Engine, SamplingParams
from serve.registry import AdapterRegistry
from serve.training_runs import RunState, TrainingRuns, TrainingRunsSettings

RUN_NAME = "bench-train-while-serving"


@dataclass
class Timing:
    request_s: float
    """Submission to the last token."""
    token_s: float
    """Mean gap between tokens after the first."""
    tokens: int


def timed_request(engine: Engine, request: ChatRequest, timeout_s: float) -> Timing:
    stream = engine.submit(request)
    result = stream.wait(timeout_s)
    if result.error:
        raise RuntimeError(f"request to {request.adapter} failed: {result.error}")
    times = stream.token_times
    if len(times) < 2:
        raise RuntimeError(f"{request.adapter} replied with {len(times)} token(s); per-token latency needs 2 or more")
    return Timing(times[-1] - stream.queued_at, (times[-1] - times[0]) / (len(times) - 1), len(times))


def phase(engine: Engine, request: ChatRequest, count: int, deadline: float) -> list[Timing]:
    """`count` requests one after another; fewer if the deadline comes first."""
    timings = []
    while len(timings) < count and time.monotonic() < deadline:
        timings.append(timed_request(engine, request, max(1.0, deadline - time.monotonic())))
    return timings


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]


def summary(timings: list[Timing]) -> dict:
    requests, tokens = [t.request_s for t in timings], [t.token_s for t in timings]
    return {"requests": len(timings),
            "per_request_s": {"median": round(statistics.median(requests), 5), "p90": round(p90(requests), 5)},
            "per_token_s": {"median": round(statistics.median(tokens), 6), "p90": round(p90(tokens), 6)},
            "tokens_per_reply": sorted({t.tokens for t in timings})}


def cpu_model() -> str:
    """The CPU's model and bf16 features (`bench.machine.cpu_model`), with the core count."""
    return f"{machine.cpu_model()}, {os.cpu_count()} cores"


def wait_for_steps(runs: TrainingRuns, run, deadline: float) -> int:
    """Block until the run is in its optimizer steps (past imports, data and the base's load)."""
    for progress in runs.events(run, interval_s=0.2):
        if progress.done:
            raise RuntimeError(f"the training run ended before the measurement ({progress.state}): "
                               f"{progress.error or progress.log_tail[-5:]}")
        if progress.step >= 1:
            return progress.step
        if time.monotonic() > deadline:
            raise RuntimeError(f"the training run had not reached its first step in time; log: {progress.log_tail[-5:]}")
    raise AssertionError("events() ended without a final snapshot")


def measure(args, engine: Engine, request: ChatRequest, runs: TrainingRuns, data: Path, deadline: float) -> dict:
    engine_phase = lambda: phase(engine, request, args.requests, deadline)  # noqa: E731
    phase(engine, request, 3, deadline)  # warm-up: the adapter resident, the loop's threads chosen
    before = engine_phase()
    settings = runs.defaults(name=args.adapter, data=data)
    run = runs.start(RUN_NAME, data, settings.r, settings.alpha, settings.lr, settings.epochs)
    try:
        first_step = wait_for_steps(runs, run, time.monotonic() + args.start_timeout_s)
        started = time.monotonic()
        during = engine_phase()
        window_s = time.monotonic() - started
        still = runs.progress(run)
    finally:
        stopped = runs.stop(run)
    if still.state != RunState.RUNNING:
        raise RuntimeError(f"the training run ended during the measurement ({still.state}); raise --epochs")
    after = engine_phase()
    alone = summary(before + after)
    with_training = summary(during)
    return {
        "without_training": {**alone, "before": summary(before), "after": summary(after)},
        "with_training": with_training,
        "ratio": {kind: {stat: round(with_training[kind][stat] / alone[kind][stat], 3) for stat in ("median", "p90")}
                  for kind in ("per_token_s", "per_request_s")},
        "training": {"steps_during_measurement": still.step - first_step,
                     "steps_per_s": round((still.step - first_step) / window_s, 3), "settings": settings.__dict__,
                     "max_threads": runs.settings.max_threads, "niceness": runs.settings.niceness,
                     "state_after_stop": str(stopped.state)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--adapters", default=None, help="the store served from (default: $ADAPTERS_DIR or adapters/store)")
    parser.add_argument("--adapter", default="json", choices=sorted(PROMPTS), help="the adapter requested")
    parser.add_argument("--data", default=None, help="what the run trains on (default: data/<adapter>/train.jsonl)")
    parser.add_argument("--requests", type=int, default=60, help="requests in each of the three phases")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--train-threads", type=int, default=1, help="the run's intra-op threads")
    parser.add_argument("--niceness", type=int, default=19, help="the run's nice value")
    parser.add_argument("--start-timeout-s", type=float, default=60.0, help="for the run to reach its first step")
    parser.add_argument("--budget-s", type=float, default=150.0, help="the whole bench's time limit")
    parser.add_argument("--out", default="bench/results/train-while-serving.json")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    store = AdapterStore(args.adapters)
    if not store.exists(args.adapter):
        raise SystemExit(f"adapter {args.adapter!r} is not in {store.root}: run make demo-adapters")
    data = Path(args.data or f"data/{args.adapter}/train.jsonl")
    base = load_base(BaseConfig(args.base))
    registry = AdapterRegistry(store, BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    engine = Engine(base, registry)
    request = ChatRequest(args.adapter, (Message("user", PROMPTS[args.adapter]),),
                          SamplingParams(max_new_tokens=args.max_new_tokens))
    with tempfile.TemporaryDirectory(prefix="train-while-serving-") as scratch:
        runs = TrainingRuns(TrainingRunsSettings(
            data_roots=(data.parent.resolve(),), store_dir=Path(scratch) / "store", base=args.base,
            runs_dir=Path(scratch) / "runs", reports_dir=Path("reports"), max_threads=args.train_threads,
            niceness=args.niceness))
        try:
            figures = measure(args, engine, request, runs, data, deadline)
        finally:
            runs.close()
            engine.close()
    results = {"machine": cpu_model(), "base": args.base, "adapter": args.adapter, "max_new_tokens": args.max_new_tokens,
               "serving_intra_op_threads": engine.decode_threads, **figures}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"machine                  {results['machine']}")
    for kind in ("per_token_s", "per_request_s"):
        alone, during = results["without_training"][kind], results["with_training"][kind]
        print(f"{kind:<24} without: median {alone['median']:.5f} p90 {alone['p90']:.5f}   "
              f"with training: median {during['median']:.5f} p90 {during['p90']:.5f}   "
              f"ratio {results['ratio'][kind]['median']:.2f} / {results['ratio'][kind]['p90']:.2f}")
    print(f"training                 {results['training']['steps_during_measurement']} steps during the measurement "
          f"({results['training']['steps_per_s']}/s), {args.train_threads} thread(s), nice {args.niceness}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
