"""The adapter x task matrix: every servable adapter and the base on every task's eval set.

Generation goes through the serving engine: requests are interleaved example by example, so every
batch mixes all the adapters (the same path a server's traffic takes). Exact match is the
training metric's (`adapters.metric`). Written to reports/eval.md, eval.png and eval.json
(the UI's Adapters tab shows the matrix from the JSON: `serve.reports.read_matrix`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from adapters import AdapterStore, BaseConfig, BaseShape, load_base
from adapters.data import Example, load_examples
from adapters.metric import is_exact_match
from experiments.report import markdown_table, plot_heatmap
from serve.engine import ChatRequest, Engine, SamplingParams
from serve.registry import BASE_NAME, AdapterRegistry
from serve.reports import EVAL_JSON, EvalMatrix


def task_sets(data_dir: Path, limit: int) -> dict[str, list[Example]]:
    return {p.parent.name: load_examples(p)[:limit] for p in sorted(Path(data_dir).glob("*/eval.jsonl"))}


def evaluate_all(engine: Engine, sets: dict[str, list[Example]]) -> EvalMatrix:
    entries = engine.registry.servable()
    models = [BASE_NAME, *[e.name for e in entries]]
    tokenizer = engine.base.tokenizer
    jobs: list[tuple[str, str, Example]] = []
    requests: list[ChatRequest] = []
    for task, examples in sets.items():
        longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
        params = SamplingParams(max_new_tokens=longest + 8)
        for example in examples:
            for model in models:  # model innermost: each engine batch mixes every adapter
                jobs.append((model, task, example))
                requests.append(ChatRequest(model, example.prompt, params))
    results = engine.generate(requests)
    hits: dict[str, dict[str, int]] = {m: {t: 0 for t in sets} for m in models}
    for (model, task, example), result in zip(jobs, results):
        if result.error:
            raise RuntimeError(f"{model} on {task}: {result.error}")
        hits[model][task] += is_exact_match(result.text, example.reference)
    scores = {m: {t: hits[m][t] / len(sets[t]) for t in sets} for m in models}
    trained_on = {e.name: e.card.task for e in entries if e.card is not None}
    return EvalMatrix(models, list(sets), scores, trained_on, {t: len(x) for t, x in sets.items()})


def write_report(matrix: EvalMatrix, reports: Path, base_path: str) -> Path:
    reports.mkdir(parents=True, exist_ok=True)
    plot_heatmap(reports / "eval.png", matrix.models, matrix.tasks, [matrix.row(m) for m in matrix.models],
                 "exact match: model x task")

    def cell(model: str, task: str) -> str:
        value = f"{matrix.scores[model][task]:.3f}"
        return f"**{value}**" if matrix.trained_on.get(model) == task else value

    table = markdown_table(["model", *matrix.tasks], [[m, *[cell(m, t) for t in matrix.tasks]] for m in matrix.models])
    counts = ", ".join(f"{t} {n}" for t, n in matrix.examples.items())
    text = f"""# Adapter x task matrix

Every servable adapter and the base alone on every task's eval set (exact match, greedy), base
`{base_path}`, generated through the serving engine in mixed-adapter batches. Bold: the adapter's own
task (from its card). Examples per task: {counts}.

{table}

![matrix](eval.png)
"""
    (reports / "eval.md").write_text(text)
    (reports / EVAL_JSON).write_text(json.dumps(asdict(matrix), indent=2) + "\n")
    return reports / "eval.md"


def build_engine(base_path: str, adapters: str | None, quantize: bool) -> Engine:
    """The serving engine over every servable adapter, all of them loaded at once."""
    base = load_base(BaseConfig(base_path, quantize=quantize))
    registry = AdapterRegistry(AdapterStore(adapters), BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    return Engine(base, registry, max_loaded=max(1, len(registry.servable())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments eval",
                                     description="Every servable adapter and the base on every task's eval set.")
    parser.add_argument("--base", default="models/demo-base", help="Base model folder or hub id.")
    parser.add_argument("--adapters", default=None, help="Adapter store (default: $ADAPTERS_DIR or adapters/store).")
    parser.add_argument("--no-quant", action="store_true", help="Load the base unquantized.")
    parser.add_argument("--data-dir", default="data", help="Folder of <task>/eval.jsonl files.")
    parser.add_argument("--limit", type=int, default=200, help="Examples per task.")
    parser.add_argument("--reports", default="reports")
    args = parser.parse_args(argv)
    engine = build_engine(args.base, args.adapters, quantize=not args.no_quant)
    try:
        sets = task_sets(Path(args.data_dir), args.limit)
        if not sets:
            print(f"error: no <task>/eval.jsonl under {args.data_dir}", file=sys.stderr)
            return 2
        matrix = evaluate_all(engine, sets)
    finally:
        engine.close()
    path = write_report(matrix, Path(args.reports), args.base)
    print(path.read_text())
    return 0
