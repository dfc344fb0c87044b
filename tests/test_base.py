"""Base loading: fallback chat template, pad token without resizing, fingerprint, unquantized LoRA."""

from __future__ import annotations

import json
import shutil

from adapters.base import BaseConfig, base_fingerprint, load_base, load_tokenizer
from adapters.card import read_card
from adapters.chat import FALLBACK_CHAT_TEMPLATE
from adapters.store import AdapterStore
from train.__main__ import main as train_cli


def test_a_bare_tokenizer_gets_the_fallback_template_and_a_pad_token(tiny_base, tmp_path):
    bare = shutil.copytree(tiny_base, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer, source = load_tokenizer(str(bare))
    original, original_source = load_tokenizer(str(tiny_base))
    assert (source, original_source) == ("fallback", "base")
    assert tokenizer.chat_template == FALLBACK_CHAT_TEMPLATE
    assert tokenizer.pad_token == tokenizer.unk_token and len(tokenizer) == len(original)


def test_fingerprint_follows_config_and_weights_not_the_folder(tiny_base, tmp_path):
    copy = shutil.copytree(tiny_base, tmp_path / "copy")
    assert base_fingerprint(str(copy)) == base_fingerprint(str(tiny_base))
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    assert base_fingerprint(str(copy)) != base_fingerprint(str(tiny_base))


def test_no_quant_loads_plain_weights_and_trains_plain_lora(tiny_base, toy_task, tmp_path):
    base = load_base(BaseConfig(str(tiny_base), quantize=False))
    assert type(base.model.model.layers[0].mlp.up_proj).__name__ == "Linear" and base.quantization == "none"
    args = ["--name", "plain", "--base", str(tiny_base), "--data", str(toy_task), "--no-quant", "--max-steps", "2",
            "--adapters", str(tmp_path / "store"), "--runs-dir", str(tmp_path / "runs")]
    assert train_cli(args) == 0
    assert read_card(AdapterStore(tmp_path / "store").path("plain")).base.quantization == "none"
