"""The adapter x task matrix: every servable adapter and the base on every task's eval set.

Generation goes through the serving engine: requests are interleaved example by example, so every
batch mixes all the adapters (the same path a server's traffic takes). Exact match is the
training metric's (`train.evaluate.normalize`). Written to reports/eval.md, eval.png and eval.json
(the UI's Adapters tab shows the matrix from the JSON).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from serve.engine import ChatRequest, Engine, SamplingParams
from serve.registry import BASE_NAME
from train.data import Example, load_examples
from train.evaluate import normalize
from train.report import markdown_table, plot_heatmap

EVAL_JSON = "eval.json"


@dataclass
class EvalMatrix:
    models: list[str]
    tasks: list[str]
    scores: dict[str, dict[str, float]]
    """model -> task -> exact match."""
    trained_on: dict[str, str]
    """adapter -> the task its card names (the diagonal)."""
    examples: dict[str, int]

    def row(self, model: str) -> list[float]:
        return [self.scores[model][t] for t in self.tasks]


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
        hits[model][task] += normalize(result.text) == normalize(example.reference)
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


def read_matrix(reports: Path) -> EvalMatrix | None:
    path = Path(reports) / EVAL_JSON
    if not path.is_file():
        return None
    return EvalMatrix(**json.loads(path.read_text()))
