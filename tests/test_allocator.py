"""A CPU training process keeps its freed activation memory for the next step (train/allocator.py)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train.loop as loop

REPO = Path(__file__).resolve().parents[1]


def test_a_cpu_run_and_only_a_cpu_run_sets_the_allocator(monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(1) or True)
    loop.prepare_process(torch.device("meta"))  # any device but the CPU
    assert calls == []
    loop.prepare_process(torch.device("cpu"))
    assert calls == [1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")
def test_glibc_takes_both_thresholds():
    """In a process of its own: the settings last for the life of the process they are made in."""
    done = subprocess.run([sys.executable, "-c", "from train.allocator import keep_freed_memory; print(keep_freed_memory())"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
