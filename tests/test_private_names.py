"""No module reaches into another module's private names: a `_name` that one module of ours
defines is read or set only by that module (STYLE.md: public interfaces between rooms)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("adapters", "train", "serve", "bench", "experiments", "demo")


def private_definitions(tree: ast.AST) -> set[str]:
    """`_names` a module defines: its functions, classes, methods, and attributes it assigns on self."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every `x._name` where x is not self or cls, and every `from m import _name`."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                uses.append((node.lineno, node.attr))
        elif isinstance(node, ast.ImportFrom):
            uses += [(node.lineno, a.name) for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return uses


def violations(root: Path, packages=CHECKED) -> list[str]:
    files = [f for p in packages for f in sorted((root / p).rglob("*.py"))]
    trees = {f: ast.parse(f.read_text(), str(f)) for f in files}
    owners: dict[str, set[Path]] = {}
    for file, tree in trees.items():
        for name in private_definitions(tree):
            owners.setdefault(name, set()).add(file)
    found = []
    for file, tree in trees.items():
        for line, name in private_uses(tree):
            others = owners.get(name, set()) - {file}
            if others and file not in owners.get(name, set()):
                found.append(f"{file.relative_to(root)}:{line}: ._{name[1:]} belongs to "
                             f"{', '.join(str(o.relative_to(root)) for o in sorted(others))}")
    return found


def test_no_module_uses_another_modules_private_names():
    assert violations(REPO) == []


def test_the_check_sees_a_private_name_used_across_modules(tmp_path):
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "engine.py").write_text("class Engine:\n    def __init__(self):\n        self._lock = None\n")
    (tmp_path / "serve" / "batcher.py").write_text("def step(engine):\n    with engine._lock:\n        pass\n")
    assert violations(tmp_path, ("serve",)) == ["serve/batcher.py:2: ._lock belongs to serve/engine.py"]
