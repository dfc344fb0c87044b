"""The QLoRA loop on a tiny 4-bit base: what trains, what stays frozen, what is saved, resumed and refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import train.loop as loop
from adapters.base import BaseConfig, load_base
from adapters.card import read_card
from adapters.data import load_examples
from adapters.store import AdapterStore
from tests.conftest import chat, write_jsonl
from train.__main__ import main as train_cli
from train.config import config_from_args
from train.data import collate, tokenize
from train.evaluate import exact_match, token_loss_sum
from train.verify import eval_examples, verify

EXPECTED_FILES = {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "card.json", "loss.png", "README.md"}


def toy_args(base: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--name", "toy", "--base", str(base), "--data", str(data), "--eval-data", str(data.parent / "eval.jsonl"),
            "--r", "8", "--alpha", "16", "--lr", "5e-3", "--epochs", "10", "--micro-batch-size", "8",
            "--runs-dir", str(tmp_path / "runs"), "--adapters", str(tmp_path / "store"), *extra]


@torch.no_grad()
def dense_weights(model) -> dict[str, torch.Tensor]:
    """Each frozen 4-bit layer's weight as it computes, read through its forward on the identity.

    The bytes are not compared: bitsandbytes repacks 4-bit weights for its CPU kernel on the
    first forward, which changes their layout but not their values. Keys drop peft's prefix.
    """
    import bitsandbytes as bnb

    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return {n.replace("base_model.model.", "").replace(".base_layer", ""): m(torch.eye(m.in_features)) for n, m in layers.items()}


def test_two_steps_change_every_lora_matrix_and_leave_the_4bit_base_frozen(tiny_base, toy_task):
    config = config_from_args(["--name", "x", "--base", str(tiny_base), "--data", str(toy_task), "--dropout", "0"])
    base = load_base(config.base)
    assert type(base.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = loop.attach_lora(base.model, config, n_layers=2)
    # The reference is a second copy of the same 4-bit base, computed with the same (training)
    # kernel: attach_lora keeps bitsandbytes from repacking the weights for its CPU inference one.
    reference = load_base(config.base).model
    loop.keep_4bit_layers_differentiable(reference)
    frozen_before = dense_weights(reference)
    others_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" not in n}
    items, _ = tokenize(load_examples(toy_task)[:8], base.tokenizer, 512, "drop", toy_task)
    optimizer = loop.make_optimizer(model, config, base.device)
    for _ in range(2):  # step 1 moves only B (A's gradient is zero while B is); step 2 moves A too
        batch = {k: v.to(base.device) for k, v in collate(items, base.tokenizer.pad_token_id).items()}
        loss, _ = token_loss_sum(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if n in others_before and not torch.equal(p, others_before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(frozen_before) == 14 and len(trainable) == 28  # 7 linear layers x 2 blocks, A and B each
    assert all("lora_" in n for n in trainable)
    assert changed == trainable  # norms, embeddings and the head did not move
    after = dense_weights(model)
    assert all(torch.equal(after[n], w) for n, w in frozen_before.items())


@pytest.mark.slow
def test_end_to_end_adapter_beats_base_and_reloads_with_plain_peft(tiny_base, toy_task, tmp_path):
    assert train_cli(toy_args(tiny_base, toy_task, tmp_path)) == 0
    store = AdapterStore(tmp_path / "store")
    folder = store.path("toy")
    assert {p.name for p in folder.iterdir()} == EXPECTED_FILES
    card = read_card(folder)
    assert card.metric.adapter > card.metric.base
    assert card.metric.adapter >= 0.8
    assert card.base.quantization == "nf4-double-quant" and card.base.architecture == "LlamaForCausalLM"
    assert card.lora.r == 8 and card.lora.alpha == 16 and 0 < card.lora.trainable_params < card.lora.total_params
    assert card.dataset.train_examples == 120 and card.dataset.eval_examples == 6
    assert card.training.eval_loss < card.training.history[0]["train_loss"]
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8

    # Plain peft on a freshly loaded 4-bit base reproduces the card's metric.
    card_score, reloaded = verify(store, "toy")
    assert reloaded == card_score == card.metric.adapter


@pytest.mark.slow
def test_verify_reloads_with_plain_peft_and_gets_the_same_replies(tiny_base, toy_task, tmp_path):
    result = loop.train(config_from_args(toy_args(tiny_base, toy_task, tmp_path, "--max-steps", "20")))
    base = load_base(BaseConfig(str(tiny_base)))
    model = PeftModel.from_pretrained(base.model, str(result.adapter_dir))
    examples = eval_examples(result.card)
    replies = exact_match(model, base.tokenizer, examples, base.device).outputs
    with model.disable_adapter():
        base_replies = exact_match(model, base.tokenizer, examples, base.device).outputs
    assert replies != base_replies  # the adapter is not a no-op
    assert len(examples) == result.card.metric.eval_examples == 6


@pytest.mark.slow
def test_a_save_that_fails_midway_keeps_the_previous_adapter(tiny_base, toy_task, tmp_path, monkeypatch):
    assert train_cli(toy_args(tiny_base, toy_task, tmp_path, "--max-steps", "2")) == 0
    store = AdapterStore(tmp_path / "store")
    old = {p.name: p.read_bytes() for p in store.path("toy").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("train.save.plot_losses", crash)  # after the weights and card are written
    with pytest.raises(OSError, match="disk full"):
        loop.train(config_from_args(toy_args(tiny_base, toy_task, tmp_path, "--max-steps", "3")))
    assert {p.name: p.read_bytes() for p in store.path("toy").iterdir()} == old
    assert list((tmp_path / "store" / ".staging").iterdir()) == []
    assert len(store.versions("toy")) == 1


@pytest.mark.slow
def test_retraining_replaces_the_adapter_and_keeps_the_previous_version(tiny_base, toy_task, tmp_path):
    for steps in ("2", "3"):
        assert train_cli(toy_args(tiny_base, toy_task, tmp_path, "--max-steps", steps)) == 0
    store = AdapterStore(tmp_path / "store")
    versions = store.versions("toy")
    assert len(versions) == 2
    assert read_card(store.path("toy")).training.steps == 3
    assert read_card(versions[0]).training.steps == 2


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tiny_base, toy_task, tmp_path, monkeypatch):
    args = ["--max-steps", "6", "--checkpoint-every", "2", "--dropout", "0.1", "--epochs", "1", "--log-every", "1"]
    whole = loop.train(config_from_args(toy_args(tiny_base, toy_task, tmp_path / "a", *args)))
    rng_whole = torch.get_rng_state()

    class Crash(Exception):
        pass

    real_save = loop.save_checkpoint

    def save_then_crash(folder, model, optimizer, scheduler, progress, keep=2):
        path = real_save(folder, model, optimizer, scheduler, progress, keep)
        if progress.step == 4:
            raise Crash
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        loop.train(config_from_args(toy_args(tiny_base, toy_task, tmp_path / "b", *args)))
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    torch.manual_seed(999)  # whatever the process did meanwhile, the checkpoint's RNG state wins
    resumed = loop.train(config_from_args(toy_args(tiny_base, toy_task, tmp_path / "b", *args, "--resume")))
    assert resumed.card.training.steps == whole.card.training.steps == 6
    assert resumed.card.training.train_loss == pytest.approx(whole.card.training.train_loss, abs=1e-6)
    history, expected = resumed.card.training.history, whole.card.training.history
    assert [sorted(h) for h in history] == [sorted(h) for h in expected] and len(history) == 7
    for got, want in zip(history, expected):
        assert {k: pytest.approx(v, abs=1e-6) for k, v in want.items()} == got
    assert torch.equal(torch.get_rng_state(), rng_whole)


BAD_SETTINGS = [
    (["--r", "0"], "lora.r must be > 0"),
    (["--alpha", "-1"], "lora.alpha must be > 0"),
    (["--target-modules", "q_proj", "wq"], "unknown target module(s) ['wq']"),
    (["--last-layers", "9"], "the base has 2 blocks"),
    (["--name", "../evil"], "invalid adapter name"),
    (["--on-long", "error", "--max-length", "12"], "longer than max_length=12"),
    (["--optimizer", "sgd"], "optim.optimizer must be one of adamw, paged_adamw_8bit, got 'sgd'"),
    (["--optimizer", "paged_adamw_8bit", "--device", "cpu"], "paged_adamw_8bit pages its states through CUDA memory; the base is on cpu"),
]


@pytest.mark.parametrize("extra,message", BAD_SETTINGS)
def test_bad_settings_error_clearly_and_write_nothing(tiny_base, toy_task, tmp_path, capsys, extra, message):
    assert train_cli(toy_args(tiny_base, toy_task, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


def test_bad_data_errors_before_training_and_writes_nothing(tiny_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d" / "train.jsonl", [chat("a", "b"), chat("c", "d"), '{"messages": [{"role": "user", "content": "x"}]}'])
    code = train_cli(["--name", "x", "--base", str(tiny_base), "--data", str(data), "--adapters", str(tmp_path / "store"), "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    assert f"{data}:3: field 'messages': the conversation must end with an assistant reply" in capsys.readouterr().err
    assert not (tmp_path / "store").exists() and not (tmp_path / "runs").exists()


@torch.no_grad()
def test_a_saved_adapter_reloads_to_identical_outputs(tiny_base, toy_task, tmp_path):
    config = config_from_args(["--name", "x", "--base", str(tiny_base), "--data", str(toy_task), "--dropout", "0"])
    base = load_base(config.base)
    model = loop.attach_lora(base.model, config, n_layers=2)
    items, _ = tokenize(load_examples(toy_task)[:8], base.tokenizer, 512, "drop", toy_task)
    batch = collate(items, base.tokenizer.pad_token_id)
    optimizer = loop.make_optimizer(model, config, base.device)
    with torch.enable_grad():
        for _ in range(2):
            token_loss_sum(model, batch)[0].backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.save_pretrained(tmp_path / "saved")
    fresh = load_base(config.base)
    loop.keep_4bit_layers_differentiable(fresh.model)  # the trained model's kernel (not bitsandbytes' CPU inference one)
    reloaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "saved"))
    after = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(before, after, atol=1e-5)
    with reloaded.disable_adapter():  # and the adapter is not a no-op
        base_logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(base_logits, after, atol=1e-3)
