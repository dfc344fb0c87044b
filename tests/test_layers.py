"""One-way layers (STYLE.md, "The shape of the system"): every import in the project's packages,
top-level or inside a function, checked against the edges the layering forbids."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("adapters", "train", "serve", "experiments", "bench", "demo")
FORBIDDEN = {
    # The contract: both sides import it; it imports neither, nor anything built on them.
    "adapters": {"train", "serve", "experiments", "bench", "demo"},
    "train": {"serve", "experiments", "bench", "demo"},
    "serve": {"train", "experiments", "bench", "demo"},
    # Benchmarks may import train/ and serve/ (and the demo's tokenizer); experiments are a leaf tier.
    "bench": {"experiments"},
    "demo": {"experiments", "bench"},
    "experiments": set(),
}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    source: str
    target: str
    module: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} -> {self.target} (imports {self.module})"


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module, nested ones included; relative
    imports are skipped (the project has none, and they cannot leave their package)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def forbidden_imports(root: Path, forbidden: dict[str, set[str]] = FORBIDDEN) -> list[Violation]:
    """Every import under root/<layer>/ whose top-level package the layer may not import."""
    violations = []
    for layer, banned in forbidden.items():
        for path in sorted((root / layer).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, module in imported_modules(tree):
                target = module.split(".", 1)[0]
                if target in banned:
                    violations.append(Violation(str(path.relative_to(root)), line, layer, target, module))
    return violations


def test_no_layer_imports_what_it_must_not():
    violations = forbidden_imports(ROOT)
    assert not violations, "forbidden imports:\n" + "\n".join(map(str, violations))


def test_every_layer_is_checked():
    assert set(FORBIDDEN) == set(LAYERS)
    for layer in LAYERS:
        assert list((ROOT / layer).rglob("*.py")), f"{layer}/ has no Python files: the check would pass vacuously"


def test_the_checker_reports_a_forbidden_edge_with_file_and_line(tmp_path):
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "ok.py").write_text("import json\nfrom serve.engine import Engine\nfrom adapters import Message\n")
    (tmp_path / "serve" / "bad.py").write_text(
        '"""A serve module that reaches into train/ inside a function."""\n'
        "import os\n\n\n"
        "def score():\n"
        "    from train.evaluate import exact_match\n"
        "    return exact_match\n"
    )
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "worse.py").write_text("import experiments.matrix\n")
    violations = forbidden_imports(tmp_path)
    assert [str(v) for v in violations] == [
        "adapters/worse.py:1: adapters -> experiments (imports experiments.matrix)",
        "serve/bad.py:6: serve -> train (imports train.evaluate)",
    ]
