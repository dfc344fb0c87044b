"""Resumable checkpoints: LoRA weights, optimizer, scheduler, step and every RNG state."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file


@dataclass
class Progress:
    """Where a run is; saved with each checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    """Real (non-padding) tokens processed, by all the processes of a launch together."""
    elapsed_s: float = 0.0
    eval_s: float = 0.0
    """Of elapsed_s, the time spent scoring between epochs (left out of tokens/s)."""
    last_loss: float = float("nan")
    """Training loss of the last optimizer step."""
    history: list[dict] = field(default_factory=list)
    config_digest: str = ""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model, optimizer, scheduler, progress: Progress, keep: int = 2) -> Path:
    """Write checkpoint step-N atomically (temp folder, then rename) and keep the last `keep`.

    One process (the main one) writes a run's checkpoints, so any temp folder found here was left
    by a run killed mid-save, and is removed.
    """
    final = folder / f"step-{progress.step:08d}"
    tmp = folder / f".tmp-step-{progress.step:08d}"
    for debris in folder.glob(".tmp-step-*"):
        shutil.rmtree(debris, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, str(tmp / "adapter.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps(asdict(progress), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for stale in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*")) if folder.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> Progress:
    """Restore a checkpoint that save_checkpoint wrote.

    state.pt holds numpy RNG state, which needs full unpickling: only ever point this at the
    run folder this project wrote, never at a file a user supplied (adapters are safetensors).
    """
    set_peft_model_state_dict(model, load_file(str(path / "adapter.safetensors")))
    state = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Progress(**json.loads((path / "progress.json").read_text()))
