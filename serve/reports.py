"""Reports the UI shows: the adapter x task matrix that `make eval` (`python -m experiments eval`)
writes to reports/eval.json, read back for the Adapters tab."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


def read_matrix(reports: Path) -> EvalMatrix | None:
    path = Path(reports) / EVAL_JSON
    if not path.is_file():
        return None
    return EvalMatrix(**json.loads(path.read_text()))
