"""An adapter is checked against a base without loading its weights: shapes, identity, safety."""

from __future__ import annotations

import json
import shutil

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from adapters.base import base_fingerprint
from adapters.compat import AdapterCheckError, BaseShape, check_adapter


def make_adapter(base_path, folder, targets="all-linear"):
    model = AutoModelForCausalLM.from_pretrained(base_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes(tiny_base, other_base):
    def shape(path):
        return BaseShape.of(AutoModelForCausalLM.from_pretrained(path), base_fingerprint(str(path)))

    return shape(tiny_base), shape(other_base)


def test_an_adapter_fits_its_own_base(tiny_base, tmp_path, shapes):
    adapter = check_adapter(make_adapter(tiny_base, tmp_path / "a"), shapes[0])
    assert len(adapter.lora_shapes) == 14 and adapter.config["r"] == 4


def test_wrong_shapes_are_refused_with_the_layer_named(tiny_base, tmp_path, shapes):
    with pytest.raises(AdapterCheckError, match=r"model.layers.0.mlp.down_proj: LoRA shapes give \(128, 64\), the base layer is \(256, 128\)"):
        check_adapter(make_adapter(tiny_base, tmp_path / "a"), shapes[1])


def test_a_card_naming_another_base_is_refused(tiny_base, tmp_path, shapes):
    folder = make_adapter(tiny_base, tmp_path / "a")
    card = {"name": "a", "task": "t", "created_at": "", "versions": {}, "metric": None,
            "base": {"path": "elsewhere", "fingerprint": "sha256:other", "architecture": "LlamaForCausalLM", "quantization": "none"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0, "target_modules": ["all-linear"], "last_layers": None, "trainable_params": 1, "total_params": 2},
            "dataset": {"path": "", "sha256": "", "bytes": 0, "train_examples": 0, "eval_examples": 0, "eval_source": ""},
            "training": {"epochs": 1, "steps": 1, "learning_rate": 1, "batch_size": 1, "max_length": 1, "seed": 0,
                         "duration_s": 0, "tokens_per_s": 0, "train_loss": 0, "eval_loss": 0}}
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(AdapterCheckError, match="trained on base elsewhere"):
        check_adapter(folder, shapes[0])


def test_damaged_and_unsafe_adapters_are_refused(tiny_base, tmp_path, shapes):
    good = make_adapter(tiny_base, tmp_path / "good")
    cases = {}
    for name in ("truncated", "garbage", "pickle", "no-config", "bad-json"):
        cases[name] = shutil.copytree(good, tmp_path / name)
    weights = cases["truncated"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (cases["garbage"] / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    (cases["pickle"] / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    (cases["no-config"] / "adapter_config.json").unlink()
    (cases["bad-json"] / "adapter_config.json").write_text("{")
    expected = {"truncated": "not a readable safetensors file.*not fully covered", "garbage": "not a readable safetensors", "pickle": "pickled weights",
                "no-config": "missing adapter_config.json", "bad-json": "not valid JSON"}
    for name, folder in cases.items():
        with pytest.raises(AdapterCheckError, match=expected[name]):
            check_adapter(folder, shapes[0])


@pytest.mark.parametrize("variant, reason", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "trained biases"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, r"embedding layers \['model.embed_tokens'\]"),
])
def test_lora_variants_the_engine_cannot_route_are_refused(tiny_base, tmp_path, shapes, variant, reason):
    """Each would either change the shared base for every request or be silently dropped."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    config = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False, **variant}
    get_peft_model(model, LoraConfig(**config)).save_pretrained(tmp_path / "v")
    with pytest.raises(AdapterCheckError, match=reason):
        check_adapter(tmp_path / "v", shapes[0])
