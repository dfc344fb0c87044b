"""Real model families (tests/families.py): stop tokens read from the model and its chat template,
bitsandbytes on a layer width that is no multiple of 64, and per family a trained adapter that a
plain peft reload and the OpenAI API both answer with (the same logits, the same greedy replies,
in a mixed batch as alone), stopping at the family's end of turn."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import openai
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapters import AdapterStore, BaseConfig, BaseShape, LoadedBase, Message, load_base
from adapters.base import quantization_config
from adapters.card import AdapterCard, read_card
from adapters.chat import encode_chat, encode_prompt, end_of_turn_token
from adapters.store import CHAT_TEMPLATE_FILE
from serve.engine import ChatRequest, Engine, Prepared, SamplingParams
from serve.registry import AdapterEntry, AdapterRegistry
from serve.server import AccessConfig
from serve.service import Service
from serve.slots import DecodeSettings
from tests.conftest import LiveServer, chat, free_port, start_service, write_jsonl
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
API_KEY = "family-key"
REQUESTS = [*(("colors", f"Color of {a}?", 8) for a in ANSWERS), ("noise", "Color of cat?", 6), ("base", "Color of cat?", 6)]
"""(model, prompt, max_tokens): the trained adapter on every prompt, a second adapter and the base."""
LOGIT_RTOL = 1e-4
"""Engine and plain-peft logits agree within LOGIT_RTOL x the row's largest |logit|. Why this
bound: both sides run float32 on the CPU over the same NF4 bytes, and bitsandbytes' exact path
dequantizes them to the same float32 weights, so an adapter's rows differ only by rounding where
the order of operations differs (the engine's routed LoRA product against peft's two matmuls): a
few float32 ulps (2**-24 = 6e-8 relative) per operation over two blocks, about 1e-6 of the logit
scale as measured (docs/models.md#families-tested). 1e-4 leaves a hundredfold margin and is still a
thousand times below what a real fault moves (a missing, mis-scaled or wrong adapter moves logits
by O(1); `check_logits` asserts each adapter moves them that far)."""


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


def save_noise_adapter(store: AdapterStore, base: Path) -> None:
    """'noise': a random LoRA (init_lora_weights=False) on the layers 'colors' adapts, a second
    adapter for the mixed batch whose outputs differ from the base's."""
    trained = LoraConfig.from_pretrained(str(store.path("colors")))
    torch.manual_seed(7)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=sorted(trained.target_modules),
                                      fan_in_fan_out=trained.fan_in_fan_out, init_lora_weights=False))
    with store.write("noise") as folder:
        model.save_pretrained(folder)


@pytest.fixture(scope="session")
def trained_family(family_base, tmp_path_factory):
    """family name -> (its base folder, a store holding 'colors', trained with the real CLI, and
    'noise'), built once per session: every test of a family reuses the one training run."""
    built: dict[str, tuple[Path, AdapterStore]] = {}

    def get(name: str) -> tuple[Path, AdapterStore]:
        if name not in built:
            store = train_color_adapter(family_base(name), tmp_path_factory.mktemp(f"{name}-trained"), TRAIN_FLAGS.get(name, ()))
            save_noise_adapter(store, family_base(name))
            built[name] = (family_base(name), store)
        return built[name]

    return get


def check_card(name: str, base: LoadedBase, folder: Path) -> None:
    card = read_card(folder)
    assert card.chat is not None and card.chat.end_of_turn == FAMILIES[name].end_of_turn
    assert set(card.chat.stop_token_ids) == base.stop_token_ids
    assert card.metric.adapter == 1.0 and card.metric.stop_rate == 1.0, card.metric
    old = {k: v for k, v in card.to_dict().items() if k != "chat"}  # a card written before stop tokens were recorded
    assert AdapterCard.from_dict(old).chat is None


# -- the OpenAI API, as a client uses it

def ask(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, str, int]:
    """(content, finish_reason, completion_tokens) of one greedy chat completion."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens


def ask_together(url: str, requests: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Every request sent at the same moment (a barrier), so the decode loop batches them together."""
    barrier = threading.Barrier(len(requests))

    def send(request: tuple[str, str, int]) -> tuple[str, str, int]:
        barrier.wait()
        return ask(url, *request)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, requests))


# -- the same adapters reloaded with plain transformers + peft

@dataclass(frozen=True)
class Reference:
    """A request answered by plain transformers + peft, greedily."""

    text: str
    finish_reason: str
    new_tokens: int
    """As the API counts them: the stop token not included."""
    tokens: list[int]
    """Every token generated, a stop token included."""
    margin: float
    """The smallest gap between the two likeliest tokens over the reply's steps."""

    def answer(self) -> tuple[str, str, int]:
        """What the API should answer: `ask`'s shape."""
        return self.text, self.finish_reason, self.new_tokens


def plain_peft(base_path: Path, store: AdapterStore) -> PeftModel:
    """'colors' and 'noise' loaded with PeftModel.from_pretrained on a fresh 4-bit base built by
    transformers and bitsandbytes alone: the same NF4 settings, float32 compute, and the exact
    dequantize path that adapters.base keeps (its bf16 CPU kernel is another model)."""
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), quantization_config=nf4, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(model, str(store.path("colors")), adapter_name="colors")
    model.load_adapter(str(store.path("noise")), adapter_name="noise")
    return model.eval()


@contextmanager
def adapter_on(model: PeftModel, name: str):
    """This (test-only, unshared) model answering as `name`; 'base' disables the adapters."""
    if name == "base":
        with model.disable_adapter():
            yield model
        return
    model.set_adapter(name)
    yield model


@torch.no_grad()
def plain_greedy(model: PeftModel, tokenizer, prepared: Prepared) -> Reference:
    ids = torch.tensor([prepared.prompt])
    stops = sorted(prepared.stop_ids)
    with adapter_on(model, prepared.request.adapter):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=prepared.max_new,
                             do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    words = [t for t in new if t not in stops]
    top2 = torch.cat(out.logits).topk(2, dim=-1).values  # [steps, 2]
    return Reference(tokenizer.decode(words, skip_special_tokens=True).strip(), "stop" if new[-1] in stops else "length",
                     len(words), new, float((top2[:, 0] - top2[:, 1]).min()))


@torch.no_grad()
def plain_logits(model: PeftModel, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    with adapter_on(model, adapter):
        return model(input_ids=ids).logits  # [1, seq, vocab]


@torch.no_grad()
def engine_logits(service: Service, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    """The served model's logits for one row routed to `adapter`, under the engine's lock."""
    entry = service.registry.resolve(adapter)
    engine = service.engine
    with engine.lock:
        engine.make_resident([entry] if entry else [])
        return engine.route([entry.key if entry else None])(input_ids=ids).logits  # [1, seq, vocab]


def check_logits(plain: PeftModel, service: Service, prepared: list[Prepared], references: list[Reference]) -> list[float]:
    """Plain peft's and the engine's logits over each prompt and its reply agree within LOGIT_RTOL;
    returns each row's tolerance, in logits. No adapter is a no-op: each moves logits far beyond it."""
    tolerances = []
    for request, reference in zip(prepared, references):
        adapter, ids = request.request.adapter, torch.tensor([request.prompt + reference.tokens])
        ours, theirs = engine_logits(service, adapter, ids), plain_logits(plain, adapter, ids)
        tolerances.append(LOGIT_RTOL * float(theirs.abs().max()))
        assert float((ours - theirs).abs().max()) <= tolerances[-1], (adapter, float((ours - theirs).abs().max()))
        if adapter != "base":
            moved = float((theirs - plain_logits(plain, "base", ids)).abs().max())
            assert moved > 1000 * tolerances[-1], (adapter, moved)
    return tolerances


def check_answers(name: str, together: list, alone: list, references: list[Reference], tolerances: list[float],
                  end_of_turn: int) -> None:
    """Each answer of the mixed batch equals the same request alone and plain peft's greedy reply,
    wherever exact text is promised: the deterministic decode is batch-invariant, and a reply
    whose every step's two likeliest tokens are more than twice its tolerance apart (each logit may
    be off by that much) is the same greedy reply under either side's rounding. The trained
    adapter's replies must all be such replies; the base's and the noise adapter's random logits
    may not be. The trained replies are the task's words, ended by the family's end-of-turn token
    (`end_of_turn`, its id) at once; no reply shows an end-of-turn marker in its text."""
    trained = len(ANSWERS)
    clear = [r.margin > 2 * tolerance for r, tolerance in zip(references, tolerances)]
    assert all(clear[:trained]), [(r.margin, tolerance) for r, tolerance in zip(references, tolerances)]
    for got, single, reference, sure in zip(together, alone, references, clear):
        if name not in EAGER_FAMILIES or sure:
            assert got == single, (got, single)
        if sure:
            assert got == reference.answer(), (got, reference)
    assert [text for text, _, _ in together[:trained]] == list(ANSWERS.values())
    assert all(finish == "stop" and tokens <= 2 for _, finish, tokens in together[:trained]), together
    assert all(r.tokens[-1] == end_of_turn for r in references[:trained]), [r.tokens for r in references[:trained]]
    markers = (FAMILIES[name].end_of_turn, FAMILIES[name].eos)
    assert not any(marker in text for text, _, _ in together for marker in markers), together


@pytest.mark.slow
@pytest.mark.parametrize("name", SERVED_FAMILIES)
def test_family_trains_reloads_serves_and_stops_at_its_end_of_turn(name, trained_family):
    """Trained with the real CLI, reloaded with plain peft (the engine's logits), and served through
    the OpenAI API in one mixed batch ('colors' on six prompts, 'noise', the base): each answer
    equals the same request sent alone and plain peft's greedy reply, and stops at the family's
    end of turn. Seconds per family, training included: docs/models.md#families-tested."""
    base_path, store = trained_family(name)
    decode = DecodeSettings() if name in EAGER_FAMILIES else DecodeSettings(deterministic=True)
    service = start_service(base_path, store, decode=decode)
    with LiveServer(service, AccessConfig("127.0.0.1", free_port(), (), API_KEY)) as server:
        check_card(name, service.base, store.path("colors"))
        together = ask_together(server.url, REQUESTS)
        alone = [ask(server.url, *request) for request in REQUESTS]
        prepared = [service.engine.prepare(ChatRequest(m, (Message("user", p),), SamplingParams(max_new_tokens=n)))
                    for m, p, n in REQUESTS]
        plain = plain_peft(base_path, store)
        references = [plain_greedy(plain, service.base.tokenizer, request) for request in prepared]
        tolerances = check_logits(plain, service, prepared, references)
    check_answers(name, together, alone, references, tolerances,
                  service.base.tokenizer.convert_tokens_to_ids(FAMILIES[name].end_of_turn))


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
