"""Training runs in child processes, so each run's peak memory is its own."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import yaml

from adapters.card import AdapterCard, read_card
from adapters.store import AdapterStore
from train.config import TrainConfig, config_to_dict


def train_in_subprocess(config: TrainConfig) -> AdapterCard:
    """`python -m train` on this config in a child process, so each run's peak memory is its own
    (in one process the CPU's peak RSS only grows); returns the published adapter's card."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config_to_dict(config), handle)
    try:
        done = subprocess.run([sys.executable, "-m", "train", "--config", handle.name], capture_output=True, text=True)
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise RuntimeError(f"training {config.name} failed:\n{done.stderr[-3000:]}")
    return read_card(AdapterStore(config.store_dir).path(config.name))
