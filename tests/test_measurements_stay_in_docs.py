"""Measurements live in docs/performance.md and docs/history/, not in the product's docstrings,
comments or --help: a figure quoted in code is wrong after the next benchmark run, and nothing
reminds anyone to change it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("adapters", "train", "serve")

MEASUREMENT = re.compile(
    r"\b(H100|H200|A100|A10G|L40S|RTX ?\d{4})\b"  # a named device's run
    r"|\d(\.\d+)? ?(µs|us|ms)\b"  # a time per call or step
    r"|\d(\.\d+)? ?×|\b\d+(\.\d+)?x (faster|slower)\b"  # a speed-up
    r"|\d ?(tok|tokens)/s\b"  # a throughput
    r"|\bbench-\w+ on\b|\brun \d\b"  # a particular run
)


def quoted_measurements(text: str) -> list[tuple[int, str]]:
    """(line, match) for every figure of a run found in `text`."""
    return [(n, m.group(0)) for n, line in enumerate(text.splitlines(), 1) for m in MEASUREMENT.finditer(line)]


def test_the_pattern_finds_what_it_is_for():
    found = quoted_measurements('"""On an H100 the kernel took 12 µs."""\n# 3.9× the baseline\nx = 2  # 410 tokens/s\n')
    assert [n for n, _ in found] == [1, 1, 2, 3]
    assert quoted_measurements('f"{rate:.1f} tokens/s"\nmax_rows = 64  # more rows: torch\n') == []


@pytest.mark.parametrize("package", PRODUCT)
def test_no_product_code_quotes_a_measurement(package):
    files = [f for ext in ("*.py", "*.cpp") for f in sorted((REPO / package).rglob(ext))]
    found = [f"{f.relative_to(REPO)}:{n}: {m}" for f in files for n, m in quoted_measurements(f.read_text())]
    assert not found, "move these figures to docs/performance.md (a sentence of why may stay):\n" + "\n".join(found)
