"""Hostile settings, data and stores: nothing bad is published, nothing good is lost, nothing leaks.

Non-finite or out-of-range settings are refused by name; a run whose loss goes NaN publishes
nothing; cards are strict JSON; retention keeps the last good version; dead writers' staging
debris is cleaned while live writers' is kept; published files read as 0644; a giant data line
is refused without being read whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import train.loop as loop
from adapters.card import CARD_FILE, AdapterCard, read_card
from adapters.data import DataError, load_examples, read_examples
from adapters.store import AdapterStore, _process_start, is_good_version
from tests.conftest import chat, write_jsonl
from train.__main__ import main as train_cli
from train.config import DataSettings, LoraSettings, OptimSettings, TrainConfig, _leaves, config_from_args, config_from_dict

ROOT = Path(__file__).resolve().parents[1]

# -- settings ---------------------------------------------------------------------------------

FLOAT_FIELDS = ["lora.alpha", "lora.dropout", "optim.lr", "optim.warmup_ratio", "optim.weight_decay", "optim.epochs",
                "optim.max_grad_norm", "data.eval_fraction", "stop.min_stop_probability"]
OUT_OF_RANGE = [
    ("lora.r", 0), ("lora.alpha", 0.0), ("lora.alpha", -1.0), ("lora.dropout", 1.0), ("lora.dropout", -0.1),
    ("lora.last_layers", 0), ("optim.lr", 0.0), ("optim.lr", -1e-4), ("optim.warmup_ratio", 1.0),
    ("optim.weight_decay", -0.01), ("optim.epochs", -1.0), ("optim.max_steps", 0), ("optim.micro_batch_size", 0),
    ("optim.grad_accum", 0), ("optim.max_grad_norm", -1.0), ("data.eval_fraction", 0.0), ("data.eval_fraction", 1.0),
    ("data.max_eval_examples", 0), ("data.max_length", 8), ("data.max_line_bytes", 0), ("seed", -1), ("seed", 2**32),
    ("checkpoint_every", -1), ("log_every", 0), ("lora.r", 2.5), ("lora.r", True), ("optim.max_steps", 1e3),
    ("stop.min_stop_probability", 0.0), ("stop.min_stop_probability", 1.0), ("stop.probe_examples", 0),
]


def settings(dotted: str, value) -> dict:
    """A minimal config dict with one setting replaced."""
    data = {"name": "x", "data": {"path": "d/train.jsonl"}}
    *section, key = dotted.split(".")
    (data.setdefault(section[0], {}) if section else data)[key] = value
    if dotted == "optim.epochs":
        data["optim"]["max_steps"] = 3  # epochs == 0 is allowed with max_steps; -1, inf and NaN never
    return data


def test_every_numeric_setting_is_range_checked():
    """A new int or float field without a Range would not be checked: this lists them all."""
    numeric = {".".join(path): f for path, f in _leaves(TrainConfig) if str(f.type).split(" ")[0] in ("int", "float")}
    assert {p for p, f in numeric.items() if str(f.type).startswith("float")} == set(FLOAT_FIELDS)
    assert all("range" in f.metadata for f in numeric.values()), [p for p, f in numeric.items() if "range" not in f.metadata]
    assert {p for p, _ in OUT_OF_RANGE} == set(numeric)  # each has an out-of-range case below


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dotted", FLOAT_FIELDS)
def test_non_finite_float_settings_are_refused_by_name(dotted, value):
    with pytest.raises(ValueError, match="finite") as info:
        config_from_dict(settings(dotted, value))
    assert str(info.value).startswith(f"{dotted} must be ") and str(info.value).endswith(f"got {value}")


@pytest.mark.parametrize("dotted,value", OUT_OF_RANGE, ids=[f"{d}={v!r}" for d, v in OUT_OF_RANGE])
def test_out_of_range_settings_are_refused_by_name(dotted, value):
    with pytest.raises(ValueError) as info:
        config_from_dict(settings(dotted, value))
    assert str(info.value).startswith(f"{dotted} must be ") and repr(value).lower() in str(info.value).lower()


def test_yaml_style_number_strings_are_read_as_floats_and_still_checked():
    # YAML 1.1 reads `lr: 2e-4` (no dot) as a string.
    assert config_from_dict(settings("optim.lr", "2e-4")).optim.lr == 2e-4
    with pytest.raises(ValueError, match=r"optim.lr must be > 0 and finite, got inf"):
        config_from_dict(settings("optim.lr", "inf"))
    with pytest.raises(ValueError, match=r"optim.lr must be a number > 0, got 'fast'"):
        config_from_dict(settings("optim.lr", "fast"))


def test_defaults_and_shipped_yaml_pass_the_checks():
    assert LoraSettings() and OptimSettings() and DataSettings(path="d.jsonl")
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name != "serve.yaml":  # a saved ServeConfig (tests/test_config.py loads it)
            config_from_args(["--config", str(path), "--name", "x"])


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--alpha", "nan"), ("--alpha", "inf"), ("--dropout", "nan"),
                                        ("--warmup-ratio", "-inf"), ("--max-grad-norm", "nan")])
def test_the_cli_exits_non_zero_naming_the_setting_and_writes_nothing(tiny_base, toy_task, tmp_path, capsys, flag, value):
    code = train_cli(["--name", "toy", "--base", str(tiny_base), "--data", str(toy_task), f"{flag}={value}",
                      "--runs-dir", str(tmp_path / "runs"), "--adapters", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and "must be" in err and "finite" in err and f"got {float(value)}" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


# -- a diverging run publishes nothing --------------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under root, hidden ones included: files by content, links by target, folders by name."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def toy_args(base: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--name", "toy", "--base", str(base), "--data", str(data), "--eval-data", str(data.parent / "eval.jsonl"),
            "--r", "8", "--alpha", "16", "--micro-batch-size", "8", "--runs-dir", str(tmp_path / "runs"),
            "--adapters", str(tmp_path / "store"), *extra]


@pytest.mark.slow
def test_a_run_whose_loss_goes_nan_exits_non_zero_and_leaves_the_store_byte_identical(tiny_base, toy_task, tmp_path, capsys):
    assert train_cli(toy_args(tiny_base, toy_task, tmp_path, "--lr", "5e-3", "--max-steps", "2")) == 0
    store = AdapterStore(tmp_path / "store")
    before = tree_digest(store.root)
    assert any(k.startswith(".versions/toy/") for k in before) and before["toy"].startswith("link:")
    capsys.readouterr()
    # lr=1e30 is a finite, valid setting: step 1 moves the LoRA matrices by ~1e30 and step 2's
    # forward overflows float32, so the loss really is NaN (not a mocked one).
    code = train_cli(toy_args(tiny_base, toy_task, tmp_path, "--lr", "1e30", "--max-steps", "6", "--checkpoint-every", "1"))
    err = capsys.readouterr().err
    assert code == 2
    assert "training diverged at step 2: loss nan" in err
    assert tree_digest(store.root) == before
    assert is_good_version(store.path("toy"))


def test_non_finite_weights_are_caught_before_publishing():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    loop.check_finite_weights(model, step=3)
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan  # frozen: not the adapter's
    loop.check_finite_weights(model, step=3)
    with torch.no_grad():
        model[1].bias[1] = math.inf
    with pytest.raises(loop.TrainingDiverged, match=r"after step 3 the trainable parameter 1.bias holds inf or NaN"):
        loop.check_finite_weights(model, step=3)


# -- cards ------------------------------------------------------------------------------------


def card_dict(**metric) -> dict:
    return {
        "name": "a", "task": "t", "created_at": "2026-01-01T00:00:00+00:00",
        "base": {"path": "b", "fingerprint": "f", "architecture": "LlamaForCausalLM", "quantization": "none"},
        "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["all-linear"], "last_layers": None,
                 "trainable_params": 10, "total_params": 100},
        "dataset": {"path": "d", "sha256": "s", "bytes": 1, "train_examples": 1, "eval_examples": 1, "eval_source": "d"},
        "training": {"epochs": 1.0, "steps": 1, "learning_rate": 1e-3, "batch_size": 1, "max_length": 16, "seed": 0,
                     "duration_s": 1.0, "tokens_per_s": 1.0, "train_loss": 1.0, "eval_loss": 1.0},
        "metric": {"name": "exact_match", "base": 0.0, "adapter": 1.0, "eval_examples": 1, **metric},
        "versions": {},
    }


def test_a_card_with_a_non_finite_number_is_not_written(tmp_path):
    card = AdapterCard.from_dict(card_dict())
    card.training.eval_loss = math.nan
    with pytest.raises(ValueError, match=r"training.eval_loss is nan; a card holds only finite numbers"):
        card.write(tmp_path)
    assert not (tmp_path / CARD_FILE).exists()
    card.training.eval_loss = 0.5
    card.write(tmp_path)
    assert json.loads((tmp_path / CARD_FILE).read_text(), parse_constant=pytest.fail)["training"]["eval_loss"] == 0.5


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_card_that_is_not_strict_json_is_refused_naming_the_file(tmp_path, bad):
    text = json.dumps(card_dict(adapter=0.5)).replace("0.5", bad)
    (tmp_path / CARD_FILE).write_text(text)
    with pytest.raises(ValueError, match=rf"{tmp_path / CARD_FILE}: unreadable adapter card: .*{bad.lstrip('-')}"):
        read_card(tmp_path)
    assert not is_good_version(tmp_path)


# -- retention --------------------------------------------------------------------------------


def publish(store: AdapterStore, name: str, tag: str, card: str | None) -> None:
    """A hand-made version, as another tool might put in: its weights, and a card or none."""
    with store.write(name) as folder:
        (folder / "weights").write_text(tag)
        if card is not None:
            (folder / CARD_FILE).write_text(card)


GOOD = json.dumps(card_dict())
NAN_CARD = json.dumps(card_dict(adapter=math.nan))  # bare NaN: what an unpatched run wrote
NO_METRIC = json.dumps({**card_dict(), "metric": None})
NOT_A_CARD = json.dumps({**card_dict(), "base": "elsewhere"})


def test_pruning_keeps_the_last_good_version_when_bad_ones_arrive(tmp_path):
    store = AdapterStore(tmp_path, keep_versions=2)
    publish(store, "a", "good", GOOD)
    for i, card in enumerate([NAN_CARD, None, NO_METRIC, "{broken", NOT_A_CARD]):
        publish(store, "a", f"bad{i}", card)
        tags = [(v / "weights").read_text() for v in store.versions("a")]
        assert tags[0] == "good" and tags[-1] == f"bad{i}" and len(tags) == min(3, i + 2)
    assert [(v / "weights").read_text() for v in store.versions("a")] == ["good", "bad3", "bad4"]
    publish(store, "a", "good2", GOOD)  # the newest good one besides the new one is still kept
    assert [(v / "weights").read_text() for v in store.versions("a")] == ["good", "bad4", "good2"]
    publish(store, "a", "good3", GOOD)  # now a good one is among the kept: back to keep_versions
    assert [(v / "weights").read_text() for v in store.versions("a")] == ["good2", "good3"]


# -- staging debris and file modes ------------------------------------------------------------


def staging_name(name: str, pid: int, start: str | None = None) -> str:
    import socket

    start = _process_start(pid) if start is None else start
    return f"{name}@{socket.gethostname()}@{pid}.{start}@0123abcd"


@pytest.mark.slow
def test_a_writer_killed_mid_save_leaves_debris_that_the_next_write_removes(tmp_path):
    killed = f"""
import os, signal
from adapters.store import AdapterStore
with AdapterStore({str(tmp_path)!r}).write("a") as folder:
    (folder / "adapter_model.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", killed], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr
    (debris,) = (tmp_path / ".staging").iterdir()
    assert (debris / "adapter_model.safetensors").read_bytes() == b"half"
    publish(AdapterStore(tmp_path), "a", "next", None)
    assert list((tmp_path / ".staging").iterdir()) == []


def test_stale_staging_of_dead_writers_is_removed_and_live_writers_kept(tmp_path):
    staging = tmp_path / ".staging"
    live_writer = subprocess.Popen(["sleep", "60"])  # another process, still writing
    dead_writer = subprocess.Popen(["true"])
    dead_writer.wait()
    try:
        entries = {
            "live_other": staging_name("a", live_writer.pid),
            "live_self": staging_name("b", os.getpid()),
            "dead": staging_name("a", dead_writer.pid),
            "reused_pid": staging_name("a", live_writer.pid, start="1"),  # same pid, another process's start time
            "unknown_fresh": "a-0123abcd",
            "unknown_old": "b-4567cdef",
            "other_host_fresh": "a@elsewhere@1.2@0123abcd",
        }
        for label, entry in entries.items():
            (staging / entry).mkdir(parents=True)
            (staging / entry / "adapter_model.safetensors").write_bytes(label.encode())
        old = time.time() - 25 * 3600
        os.utime(staging / entries["unknown_old"] / "adapter_model.safetensors", (old, old))
        os.utime(staging / entries["unknown_old"], (old, old))
        (staging / (staging_name("a", dead_writer.pid) + ".link")).symlink_to("../.versions/a/x")
        publish(AdapterStore(tmp_path), "a", "new", None)
        left = {p.name for p in staging.iterdir()}
    finally:
        live_writer.kill()
        live_writer.wait()
    assert left == {entries[k] for k in ("live_other", "live_self", "unknown_fresh", "other_host_fresh")}


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_published_files_get_the_umask_s_normal_modes(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        store = AdapterStore(tmp_path)
        with store.write("a") as folder:
            save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))  # safetensors writes 0600
            (folder / "sub").mkdir(mode=0o700)
            (folder / "sub" / "notes.txt").write_text("x")
    finally:
        os.umask(previous)
    published = store.path("a").resolve()
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [published, *published.rglob("*")]}
    assert modes == {published.name: oct(dir_mode), "adapter_model.safetensors": oct(file_mode),
                     "sub": oct(dir_mode), "notes.txt": oct(file_mode)}


# -- giant data lines -------------------------------------------------------------------------


def test_a_5mb_line_is_refused_naming_file_and_line_without_reading_it_whole(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [chat("a", "b"), chat("x" * (5 * 2**20), "y"), chat("c", "d")])
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            load_examples(path)  # the default limit, 1 MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.value.path, info.value.line) == (str(path), 2)
    assert f"{path}:2: line longer than max_line_bytes=1048576 bytes" in str(info.value)
    assert peak < 2.5 * 2**20  # the line is 5 MiB; reading it whole (and parsing it) costs several times that


def test_long_lines_are_dropped_with_their_line_numbers_or_rejected_by_the_cli(tiny_base, tmp_path, capsys):
    rows = [chat("a", "b"), chat("x" * 5000, "y"), chat("c", "d"), "", chat("z" * 3000, "y"), chat("e", "f")]
    path = write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    read = read_examples(path, max_line_bytes=1000, on_long="drop")
    assert [e.line for e in read.examples] == [1, 3, 6] and read.long_lines == [2, 5]
    code = train_cli(["--name", "x", "--base", str(tiny_base), "--data", str(path), "--max-line-bytes", "1000",
                      "--on-long", "error", "--adapters", str(tmp_path / "store"), "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    assert f"{path}:2: line longer than max_line_bytes=1000 bytes" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_prepare_data_drops_long_lines_by_default_and_counts_them(tiny_base, tmp_path):
    from adapters.base import load_tokenizer

    rows = [chat(f"q{i}", f"a{i}") for i in range(6)] + [chat("x" * 5000, "y")]
    path = write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    config = config_from_args(["--name", "x", "--base", str(tiny_base), "--data", str(path), "--max-line-bytes", "1000"])
    tokenizer, _ = load_tokenizer(str(tiny_base))
    data = loop.prepare_data(config, tokenizer)
    assert data.long_lines == [7] and len(data.train_examples) + len(data.eval_examples) == 6
