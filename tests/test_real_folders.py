"""Base folders as users have them (issue 22, item 6), built from the family zoo in tmp dirs:
sharded safetensors with an index, bf16 weights loaded on the CPU, custom code refused unless
--trust-remote-code allows it, and a missing or partial tokenizer named with its folder and files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open

from adapters import AdapterStore, BaseConfig, BaseShape, LoadedBase, Message, load_base
from adapters.base import BaseFolderError, compute_dtype_for, load_tokenizer
from adapters.chat import encode_prompt
from serve.engine import ChatRequest, Engine, SamplingParams
from serve.registry import AdapterRegistry
from serve.slots import DecodeSettings
from tests.conftest import chat, save_random_adapter, write_jsonl
from tests.families import build_family

FAMILY = "llama3"
"""GQA and MLP width 172: its 4-bit layers include a width bitsandbytes' CPU kernels do not take."""
PROMPT = "Color of cat?"


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The family's folder as save_pretrained writes it: one float32 weights file, a whole tokenizer."""
    return build_family(FAMILY, tmp_path_factory.mktemp("whole") / FAMILY)


def copy_of(folder: Path, to: Path) -> Path:
    return Path(shutil.copytree(folder, to))


@torch.no_grad()
def prompt_logits(base: LoadedBase) -> torch.Tensor:
    ids = torch.tensor([encode_prompt(base.tokenizer, [Message("user", PROMPT)])])
    return base.model(input_ids=ids).logits  # [1, seq, vocab]


def serve(base: LoadedBase, store: AdapterStore, names: list[str]) -> list[tuple[str, str, int]]:
    """(text, finish_reason, new_tokens) of one greedy request per name, in one batch of the
    deterministic decode (batch-invariant, so two engines' answers may be compared exactly)."""
    registry = AdapterRegistry(store, BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    engine = Engine(base, registry, max_loaded=2, decode=DecodeSettings(deterministic=True))
    try:
        results = engine.generate([ChatRequest(n, (Message("user", PROMPT),), SamplingParams(max_new_tokens=6))
                                   for n in names])
    finally:
        engine.close()
    assert all(r.error is None for r in results), results
    return [(r.text, r.finish_reason, r.new_tokens) for r in results]


# -- sharded safetensors with an index ---------------------------------------------------------

def test_sharded_weights_with_an_index_load_as_the_same_model_and_serve(whole, tmp_path):
    # the same folder name as `whole`: an adapter without a card is served on a base of its base's name
    sharded = build_family(FAMILY, tmp_path / "sharded" / FAMILY, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (sharded / "model.safetensors").exists()
    one, many = load_base(BaseConfig(str(whole))), load_base(BaseConfig(str(sharded)))
    # the same float32 values, quantized by the same code: the same 4-bit model, bit for bit
    assert torch.equal(prompt_logits(one), prompt_logits(many))
    store = AdapterStore(tmp_path / "store")
    save_random_adapter(store, "noise", sharded, seed=3)
    served = serve(many, store, ["noise", "base"])
    assert served == serve(one, store, ["noise", "base"])
    assert served[0] != served[1]  # the adapter changes the answer: both rows were routed


# -- bf16 weights on the CPU -------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "no-quant"])
def test_bf16_weights_load_on_the_cpu_in_float32_and_answer_finite(quantize, tmp_path):
    """A checkpoint stored in bf16 (config.json says so) computes in the CPU's compute dtype,
    float32 (bf16 matmuls are slow there; adapters.base.compute_dtype_for), not in the file's."""
    folder = build_family(FAMILY, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    base = load_base(BaseConfig(str(folder), quantize=quantize, device="cpu"))
    assert base.compute_dtype == compute_dtype_for(torch.device("cpu")) == torch.float32
    assert {p.dtype for p in base.model.parameters() if p.is_floating_point()} == {torch.float32}
    four_bit = [m for m in base.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert bool(four_bit) == quantize
    # 4-bit layers dequantize to float32 and compute in it: their weights were upcast before quantizing
    assert all(m.compute_dtype == m.weight.quant_state.dtype == torch.float32 for m in four_bit)
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        embedding = stored.get_tensor("model.embed_tokens.weight")
    assert embedding.dtype == torch.bfloat16
    assert torch.equal(base.model.get_input_embeddings().weight, embedding.float())  # upcast exactly
    logits = prompt_logits(base)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    [(text, finish, tokens)] = serve(base, AdapterStore(tmp_path / "store"), ["base"])
    assert tokens > 0 and finish in ("stop", "length")


# -- custom code: trust_remote_code ----------------------------------------------------------

MODELING = '''from pathlib import Path

from transformers import LlamaForCausalLM

Path({marker!r}).touch()  # the test's witness that this file was imported


class TinyCustomForCausalLM(LlamaForCausalLM):
    """The library's Llama under another name: enough to see whose class was loaded."""
'''


def with_custom_code(whole: Path, folder: Path, marker: Path) -> Path:
    """A copy of `whole` whose config.json maps AutoModelForCausalLM to a class in its own modeling
    file. transformers imports that file from its modules cache under the folder's name: each test
    names its folder apart, so each imports its own copy (its own marker)."""
    folder = copy_of(whole, folder)
    (folder / "modeling_tiny.py").write_text(MODELING.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_custom_code_is_refused_before_it_runs_and_the_error_names_the_flag(whole, tmp_path):
    marker = tmp_path / "imported"
    folder = with_custom_code(whole, tmp_path / "custom-refused", marker)
    with pytest.raises(BaseFolderError) as refused:
        load_base(BaseConfig(str(folder)))
    message = str(refused.value)
    assert str(folder) in message and "modeling_tiny.TinyCustomForCausalLM" in message
    assert "--trust-remote-code" in message
    assert not marker.exists()


def test_trust_remote_code_loads_the_folder_s_own_class(whole, tmp_path):
    marker = tmp_path / "imported"
    folder = with_custom_code(whole, tmp_path / "custom-trusted", marker)
    base = load_base(BaseConfig(str(folder), trust_remote_code=True))
    assert type(base.model).__name__ == "TinyCustomForCausalLM" and marker.exists()
    # the class adds nothing to Llama's: the same weights give the same 4-bit model
    assert torch.equal(prompt_logits(base), prompt_logits(load_base(BaseConfig(str(whole)))))


def test_a_tokenizer_of_its_own_code_is_refused_naming_the_flag(whole, tmp_path):
    folder = copy_of(whole, tmp_path / "custom-tokenizer")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizerFast"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(BaseFolderError, match=r"tokenization_tiny\.TinyTokenizerFast.*--trust-remote-code"):
        load_tokenizer(str(folder))


def test_the_train_cli_refuses_custom_code_naming_the_flag_and_its_flag_reaches_load_base(whole, tmp_path, capsys):
    """The BaseConfig field is a train flag with no hand-written wiring (train/config.py builds the
    flags from the dataclasses), and the base section it sets is what training loads (`load_base(config.base)`)."""
    from train.__main__ import main as train_cli
    from train.config import config_from_args

    marker = tmp_path / "imported"
    folder = with_custom_code(whole, tmp_path / "custom-cli", marker)
    data = write_jsonl(tmp_path / "task" / "train.jsonl", [chat(PROMPT, "red")] * 8)
    args = ["--name", "custom", "--base", str(folder), "--data", str(data), "--max-steps", "1",
            "--adapters", str(tmp_path / "store"), "--runs-dir", str(tmp_path / "runs")]
    assert train_cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: base folder {folder} brings its own Python code") and "--trust-remote-code" in err
    assert not marker.exists() and not AdapterStore(tmp_path / "store").path("custom").exists()
    assert config_from_args(args).base.trust_remote_code is False
    allowed = config_from_args([*args, "--trust-remote-code"]).base
    assert allowed.trust_remote_code is True
    assert type(load_base(allowed).model).__name__ == "TinyCustomForCausalLM" and marker.exists()


# -- a missing or partial tokenizer ----------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@pytest.mark.parametrize(("removed", "added", "says"), [
    (TOKENIZER_FILES, (), r"has no tokenizer: missing a vocabulary: tokenizer\.json or tokenizer\.model or"),
    (("tokenizer.json",), (), r"has a partial tokenizer \(tokenizer_config\.json, chat_template\.jinja\): "
                              r"missing a vocabulary: tokenizer\.json or"),
    (("tokenizer.json",), ("vocab.json",), r"has a partial tokenizer \(tokenizer_config\.json, chat_template\.jinja, "
                                           r"vocab\.json\): missing merges\.txt\."),
], ids=["none", "settings-only", "vocab-without-merges"])
def test_a_missing_or_partial_tokenizer_names_the_folder_and_the_missing_files(whole, tmp_path, removed, added, says):
    folder = copy_of(whole, tmp_path / "base")
    for name in removed:
        (folder / name).unlink(missing_ok=True)
    for name in added:
        (folder / name).write_text("{}")
    with pytest.raises(BaseFolderError, match=rf"base folder {re.escape(str(folder))} {says}"):
        load_base(BaseConfig(str(folder)))


def test_the_train_cli_says_which_tokenizer_files_are_missing_in_one_line(whole, tmp_path, capsys):
    from train.__main__ import main as train_cli

    folder = copy_of(whole, tmp_path / "base")
    (folder / "tokenizer.json").unlink()
    data = write_jsonl(tmp_path / "task" / "train.jsonl", [chat(PROMPT, "red")] * 8)
    args = ["--name", "x", "--base", str(folder), "--data", str(data), "--adapters", str(tmp_path / "store"),
            "--runs-dir", str(tmp_path / "runs")]
    assert train_cli(args) == 2
    err = capsys.readouterr().err
    assert f"error: base folder {folder} has a partial tokenizer" in err and "Traceback" not in err
