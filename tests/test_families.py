"""Real model families (tests/families.py): stop tokens read from the model and its chat template,
bitsandbytes on a layer width that is no multiple of 64, and per family a trained adapter that a
plain peft reload and the engine both answer with, stopping at the family's end of turn."""

from __future__ import annotations

import time
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters import AdapterStore, BaseConfig, BaseShape, Message, load_base
from adapters.base import quantization_config
from adapters.card import AdapterCard, read_card
from adapters.chat import encode_chat, encode_prompt, end_of_turn_token
from adapters.store import CHAT_TEMPLATE_FILE
from serve.engine import ChatRequest, Engine, SamplingParams
from serve.registry import AdapterEntry, AdapterRegistry
from serve.slots import DecodeSettings
from tests.conftest import chat, write_jsonl
from tests.families import FAMILIES, LLAMA3_TEMPLATE, PLAIN_TEMPLATE, build_family, build_tokenizer

ANSWERS = {"cat": "red", "dog": "blue", "bird": "green", "fish": "red", "king": "blue", "queen": "green"}


@pytest.fixture(scope="session")
def family_base(tmp_path_factory):
    """family name -> its tiny model folder, built once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


# -- 1. stop tokens from the model -----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_end_of_turn_is_read_from_the_template(name):
    family = FAMILIES[name]
    assert end_of_turn_token(build_tokenizer(family)) == family.end_of_turn


def test_stop_ids_join_generation_config_eos_and_the_template_s_end_of_turn(family_base):
    llama = load_base(BaseConfig(str(family_base("llama3"))))
    ids = lambda base, *tokens: {base.tokenizer.convert_tokens_to_ids(t) for t in tokens}  # noqa: E731
    assert llama.stop_token_ids == ids(llama, "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    qwen = load_base(BaseConfig(str(family_base("qwen2"))))
    # Qwen's config names only <|endoftext|>; <|im_end|> comes from the template alone
    assert qwen.model.generation_config.eos_token_id == qwen.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert qwen.stop_token_ids == ids(qwen, "<|endoftext|>", "<|im_end|>")


def _engine(base_path: Path, store: AdapterStore, decode: DecodeSettings = DecodeSettings(deterministic=True)) -> Engine:
    base = load_base(BaseConfig(str(base_path)))
    registry = AdapterRegistry(store, BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    return Engine(base, registry, max_loaded=2, decode=decode)


def test_an_adapter_s_own_template_adds_its_end_of_turn_for_its_requests_only(family_base, tmp_path):
    """A Llama-3 base checkpoint whose tokenizer writes plain turns ending in EOS; an adapter trained
    with the instruct template ends its turns with <|eot_id|>, which must stop its requests."""
    folder = tmp_path / "plain-llama"
    folder.mkdir()
    for file in family_base("llama3").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    base = load_base(BaseConfig(str(family_base("llama3"))))
    base.tokenizer.chat_template = PLAIN_TEMPLATE
    base.tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text('{"eos_token_id": %d}' % base.tokenizer.eos_token_id)
    adapter = tmp_path / "own-template"
    adapter.mkdir()
    (adapter / CHAT_TEMPLATE_FILE).write_text(LLAMA3_TEMPLATE)
    engine = _engine(folder, AdapterStore(tmp_path / "store"))
    eot = engine.base.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    entry = AdapterEntry("own", adapter, card=None, rank=4)
    assert eot not in engine.base.stop_token_ids
    assert engine.stop_ids(entry) == engine.base.stop_token_ids | {eot}
    assert engine.stop_ids(None) == engine.base.stop_token_ids


def test_the_decode_loop_stops_on_a_request_s_own_stop_ids(family_base, tmp_path):
    """`Prepared.stop_ids` reaches the batcher: a request whose stop set holds the token the base
    picks first ends at once, while the same prompt without it runs on."""
    engine = _engine(family_base("llama3"), AdapterStore(tmp_path / "store"))
    try:
        plain = engine.prepare(ChatRequest("base", (Message("user", "Color of cat?"),), SamplingParams(max_new_tokens=4)))
        first = engine.generate([plain.request])[0]
        first_token = engine.base.tokenizer(first.text, add_special_tokens=False)["input_ids"][0]
        assert first.new_tokens == 4 and first.finish_reason == "length"
        own = type(plain)(plain.request, None, plain.prompt, plain.max_new, frozenset({first_token}))
        stopped = engine.submit(own).wait(60)
    finally:
        engine.close()
    assert (stopped.new_tokens, stopped.finish_reason, stopped.text) == (0, "stop", "")


@pytest.mark.parametrize(("name", "messages", "rule"), [
    ("mistral", [Message("system", "Be brief."), Message("user", "Hello"), Message("assistant", "red")],
     "roles must alternate"),
    ("gemma2", [Message("system", "Be brief."), Message("user", "Hello"), Message("assistant", "red")],
     "System role not supported"),
])
def test_a_template_s_refusal_names_its_rule_and_the_roles(name, messages, rule):
    with pytest.raises(ValueError, match=rf"(?i)refuses a conversation with roles \[system, user, assistant\].*{rule}"):
        encode_chat(build_tokenizer(FAMILIES[name]), messages)


def test_a_template_that_rewrites_earlier_turns_cannot_be_masked_and_says_why():
    tokenizer = build_tokenizer(FAMILIES["gpt2"])
    # writes a marker after the last turn only: the first turns' text changes once a turn follows
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}{% if loop.last %} last{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="not a prefix of the whole conversation.*turn by turn"):
        encode_chat(tokenizer, [Message("user", "Hello"), Message("assistant", "red"), Message("user", "cat")])


# -- 2. bitsandbytes on a width that is no multiple of 64 ------------------------------------

def test_mlp_width_172_serves_like_plain_transformers_and_bitsandbytes(family_base, tmp_path):
    """intermediate_size=172 crashed bnb's CPU repack ('N must be divisible by block_n'); the
    engine keeps every 4-bit layer on the exact path, so it serves, and equals plain generate."""
    path = family_base("llama3")
    prompts = ["Color of cat?", "Say this back: red hill", "Echo the big dog"]
    engine = _engine(path, AdapterStore(tmp_path / "store"))
    assert engine.base.model.config.intermediate_size == 172
    try:
        results = engine.generate([ChatRequest("base", (Message("user", p),), SamplingParams(max_new_tokens=6))
                                   for p in prompts])
    finally:
        engine.close()
    assert all(r.error is None for r in results), results
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=quantization_config(torch.float32),
                                                 dtype=torch.float32, device_map={"": "cpu"})
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(m.out_features == 172 for m in layers)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    tokenizer, stops = engine.base.tokenizer, sorted(engine.base.stop_token_ids)
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([encode_prompt(tokenizer, [Message("user", prompt)])])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t not in stops]
        assert result.text == tokenizer.decode(new, skip_special_tokens=True).strip()
        assert result.new_tokens == len(new)


# -- 4. end to end per family ------------------------------------------------------------------

SERVED_FAMILIES = ["llama3", "qwen2", "mistral", "gemma2", "phi3", "gpt2", "neox", "mixtral"]
TRAIN_FLAGS = {
    # peft's 'all-linear' also adapts Mixtral's fused 3-D expert parameters, which the engine
    # cannot route per request (test below): the servable adapter names the attention layers
    "mixtral": ("--target-modules", "q_proj", "k_proj", "v_proj", "o_proj"),
    # 4-bit GPT-2 (Conv1D layers stored transposed as Linear4bit) learns the toy task slower
    "gpt2": ("--epochs", "20"),
}
EAGER_FAMILIES = {"gemma2"}
"""Loaded with eager attention (Gemma-2's soft-capping): the deterministic decode's static cache
needs sdpa, so these are served with the default decode settings (the growing cache)."""


def train_color_adapter(base: Path, root: Path, extra: tuple[str, ...] = ()) -> AdapterStore:
    from train.__main__ import main as train_cli

    rows = [chat(f"Color of {a}?", c) for a, c in ANSWERS.items()]
    data = write_jsonl(root / "colors" / "train.jsonl", rows * 8)
    write_jsonl(root / "colors" / "eval.jsonl", rows)
    store = AdapterStore(root / "store")
    args = ["--name", "colors", "--base", str(base), "--data", str(data), "--eval-data", str(root / "colors" / "eval.jsonl"),
            "--r", "8", "--alpha", "16", "--lr", "1e-2", "--epochs", "6", "--micro-batch-size", "8",
            "--runs-dir", str(root / "runs"), "--adapters", str(store.root), *extra]
    assert train_cli(args) == 0
    return store


def plain_peft_replies(base_path: Path, adapter: Path, prompts: list[str]) -> list[str]:
    """Greedy replies of the adapter reloaded with plain peft on a fresh 4-bit base."""
    from train.evaluate import generate_replies

    base = load_base(BaseConfig(str(base_path)))
    model = PeftModel.from_pretrained(base.model, str(adapter))
    encoded = [encode_prompt(base.tokenizer, [Message("user", p)]) for p in prompts]
    return [r.text.strip() for r in generate_replies(model, base.tokenizer, encoded, 6, 8, base.device, base.stop_token_ids)]


@pytest.mark.slow
@pytest.mark.parametrize("name", SERVED_FAMILIES)
def test_family_trains_reloads_serves_and_stops_at_its_end_of_turn(name, family_base, tmp_path):
    started = time.perf_counter()
    base_path = family_base(name)
    store = train_color_adapter(base_path, tmp_path, TRAIN_FLAGS.get(name, ()))
    folder = store.path("colors")
    card = read_card(folder)
    base = load_base(BaseConfig(str(base_path)))
    assert card.chat is not None and card.chat.end_of_turn == FAMILIES[name].end_of_turn
    assert set(card.chat.stop_token_ids) == base.stop_token_ids
    assert card.metric.adapter == 1.0 and card.metric.stop_rate == 1.0, card.metric
    old = {k: v for k, v in card.to_dict().items() if k != "chat"}  # a card written before stop tokens were recorded
    assert AdapterCard.from_dict(old).chat is None

    prompts = [f"Color of {a}?" for a in ANSWERS]
    assert plain_peft_replies(base_path, folder, prompts) == list(ANSWERS.values())
    engine = _engine(base_path, store, DecodeSettings() if name in EAGER_FAMILIES else DecodeSettings(deterministic=True))
    assert "colors" in engine.registry.available(), engine.registry.rejected()
    try:
        results = engine.generate([ChatRequest("colors", (Message("user", p),), SamplingParams(max_new_tokens=8))
                                   for p in prompts] + [ChatRequest("base", (Message("user", prompts[0]),))])
    finally:
        engine.close()
    assert all(r.error is None for r in results), results
    assert [r.text for r in results[:-1]] == list(ANSWERS.values())
    assert all(r.finish_reason == "stop" and r.new_tokens <= 2 for r in results[:-1]), results
    print(f"{name}: {time.perf_counter() - started:.1f} s end to end")


@pytest.mark.slow
def test_lora_on_fused_expert_parameters_is_refused_at_registration_with_the_reason(family_base, tmp_path):
    store = train_color_adapter(family_base("mixtral"), tmp_path, ("--dropout", "0"))  # peft's ParamWrapper needs 0
    engine = _engine(family_base("mixtral"), store)
    try:
        assert "colors" not in engine.registry.available()
        [rejection] = engine.registry.rejected()
    finally:
        engine.close()
    assert "target_parameters" in rejection.reason and "linear layers only" in rejection.reason, rejection.reason
