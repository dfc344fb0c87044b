"""Bases that never stop (issue 22): the trainer finds a stop token the base gives almost no
probability, trains its row beside the LoRA (peft's trainable_token_indices), and the engine
serves such rows per request in the mixed batch; the registry refuses token rows that do not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from adapters import AdapterStore, BaseConfig, BaseShape, Message, load_base
from adapters.card import read_card
from adapters.chat import encode_prompt
from adapters.compat import TOKEN_ROWS_SUFFIX, AdapterCheckError, check_adapter
from adapters.data import load_examples
from serve.engine import ChatRequest, Engine, SamplingParams
from serve.registry import AdapterRegistry
from serve.slots import DecodeSettings
from tests.conftest import TRAINING_SOURCES, build_once, chat, save_random_adapter, write_jsonl
from tests.never_stops import COLORS, build_never_stopping_base, one_thread
from train.config import STOP_PROBABILITY_FLOOR, StopSettings
from train.data import tokenize
from train.evaluate import generate_replies
from train.stops import plan_stop_rows, probe_stops, token_indices_for

FIXTURE_SOURCES = ("tests/never_stops.py", "tests/families.py")


def cached(request, name: str, sources: tuple[str, ...], build) -> Path:
    """build(folder) once per machine and code (conftest.build_once), else into a temporary folder."""
    scratch = request.getfixturevalue("tmp_path_factory").mktemp(name) / "built"
    return build_once(request.config, name, sources, build, scratch)


@pytest.fixture(scope="session")
def never_stops(request) -> Path:
    """The base that never emitted EOS in pretraining (tests/never_stops.py), built in seconds."""
    return cached(request, "never-stops-base", FIXTURE_SOURCES, build_never_stopping_base)


def color_data(root: Path) -> Path:
    rows = [chat(f"Color of {animal}", color) for animal, color in COLORS.items()]
    write_jsonl(root / "colors" / "eval.jsonl", rows)
    return write_jsonl(root / "colors" / "train.jsonl", rows * 8)


def train_colors(base: Path, root: Path) -> Path:
    """'colors' (the stop rows trained, as the trainer decides by itself) and 'colors-unfixed'
    (--no-train-stop-rows), trained with the CLI on the same data and settings."""
    from train.__main__ import main as train_cli

    data = color_data(root)
    for name, extra in (("colors", ()), ("colors-unfixed", ("--no-train-stop-rows",))):
        args = ["--name", name, "--base", str(base), "--data", str(data), "--eval-data", str(data.parent / "eval.jsonl"),
                "--r", "8", "--alpha", "16", "--lr", "1e-2", "--epochs", "6", "--micro-batch-size", "8",
                "--runs-dir", str(root / "runs"), "--adapters", str(root / "store"), *extra]
        with one_thread():
            assert train_cli(args) == 0
    return root


@pytest.fixture(scope="session")
def stop_adapters(request, never_stops) -> tuple[Path, AdapterStore]:
    root = cached(request, "never-stops-adapters", TRAINING_SOURCES + FIXTURE_SOURCES + ("tests/test_stop_rows.py",),
                  lambda folder: train_colors(never_stops, folder))
    return root, AdapterStore(root / "store")


# -- 1. the fixture and the detection ---------------------------------------------------------

def reply_items(base, root: Path):
    return tokenize(load_examples(color_data(root)), base.tokenizer, 64, "error", "colors")[0]


def test_the_fixture_base_answers_and_never_stops(never_stops, tmp_path):
    """Its end of turn gets less than the trainer's threshold where the replies end (the property
    the trainer detects); greedy, it says the right color and runs on into the next line."""
    base = load_base(BaseConfig(str(never_stops)))
    probe = probe_stops(base.model, reply_items(base, tmp_path), base.stop_token_ids, base.tokenizer.pad_token_id, base.device)
    eos = base.tokenizer.eos_token_id
    assert base.stop_token_ids == {eos} and base.model.config.tie_word_embeddings
    assert probe.positions == {eos: len(COLORS) * 8} and probe.probability[eos] < STOP_PROBABILITY_FLOOR
    prompts = [encode_prompt(base.tokenizer, [Message("user", f"Color of {a}")]) for a in COLORS]
    replies = generate_replies(base.model, base.tokenizer, prompts, 6, 8, base.device, base.stop_token_ids)
    assert [r.text.split()[0] for r in replies] == list(COLORS.values())
    assert not any(r.stopped for r in replies)


def test_the_trainer_fixes_only_a_base_that_never_stops(never_stops, tiny_base, tmp_path):
    """A random-weight base gives EOS far more than the threshold: nothing is trained unless asked."""
    plans = {}
    for name, path in (("never-stops", never_stops), ("random", tiny_base)):
        base = load_base(BaseConfig(str(path)))
        probe = probe_stops(base.model, reply_items(base, tmp_path), base.stop_token_ids, base.tokenizer.pad_token_id, base.device)
        plans[name] = {s: plan_stop_rows(StopSettings(train_stop_rows=s), probe).token_ids for s in (None, True, False)}
        eos = base.tokenizer.eos_token_id
        assert plans[name][True] == [eos] and plans[name][False] == []
    assert plans["never-stops"][None] == [plans["never-stops"][True][0]]
    assert plans["random"][None] == []


def test_the_rows_trained_are_the_output_head_s(never_stops, tiny_base):
    """Tied: a list (peft trains the input embedding's row, which the head shares); untied: the head alone."""
    def meta(path):
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))

    assert token_indices_for(meta(never_stops), [2]) == [2]
    assert token_indices_for(meta(tiny_base), [3]) == {"lm_head": [3]}


# -- 2. training with and without the fix -------------------------------------------------------

@pytest.mark.slow
def test_the_trained_stop_row_makes_the_adapter_stop(stop_adapters, never_stops):
    """Without the fix the adapter says the right color and runs on (exact match 0); with it, it
    stops on every eval reply and its exact match is its words'. Each run takes seconds."""
    root, store = stop_adapters
    fixed, unfixed = read_card(store.path("colors")), read_card(store.path("colors-unfixed"))
    eos = str(fixed.chat.stop_token_ids[0])
    assert fixed.stop_rows.setting == "auto" and fixed.stop_rows.trained_token_ids == [int(eos)]
    assert fixed.stop_rows.base_probability[eos] < fixed.stop_rows.threshold == STOP_PROBABILITY_FLOOR
    assert fixed.metric.stop_rate >= 0.95 and fixed.metric.base_stop_rate == 0.0
    assert fixed.metric.adapter == 1.0 and fixed.stop_rows.adapter_probability[eos] > 0.5
    config = json.loads((store.path("colors") / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == [int(eos)]  # tied: the embedding's row, shared by the head
    rows = [k for k in load_file(store.path("colors") / "adapter_model.safetensors") if k.endswith(TOKEN_ROWS_SUFFIX)]
    assert rows == ["base_model.model.model.embed_tokens" + TOKEN_ROWS_SUFFIX]

    assert unfixed.stop_rows.setting == "off" and unfixed.stop_rows.trained_token_ids == []
    assert unfixed.metric.stop_rate <= 0.2 and unfixed.metric.adapter == 0.0
    base = load_base(BaseConfig(str(never_stops)))
    model = PeftModel.from_pretrained(base.model, str(store.path("colors-unfixed")))
    prompts = [encode_prompt(base.tokenizer, [Message("user", f"Color of {a}")]) for a in COLORS]
    words = [r.text.split()[0] for r in generate_replies(model, base.tokenizer, prompts, 6, 8, base.device, base.stop_token_ids)]
    assert words == list(COLORS.values())  # the words were right all along


# -- 3. serving token rows per request ----------------------------------------------------------

def engine_on(base_path: Path, store: AdapterStore, decode: DecodeSettings) -> Engine:
    base = load_base(BaseConfig(str(base_path)))
    registry = AdapterRegistry(store, BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    assert registry.rejected() == []
    return Engine(base, registry, max_loaded=4, decode=decode)


def ask(adapter: str, *turns: str, max_new: int = 6) -> ChatRequest:
    roles = ("user", "assistant")
    return ChatRequest(adapter, tuple(Message(roles[i % 2], t) for i, t in enumerate(turns)), SamplingParams(max_new_tokens=max_new))


def plain_peft(base_path: Path, folder: Path, requests: list[ChatRequest]) -> list[str]:
    """Greedy replies of the adapter loaded with plain peft (its TrainableTokensWrapper) on a fresh 4-bit base."""
    base = load_base(BaseConfig(str(base_path)))
    model = PeftModel.from_pretrained(base.model, str(folder))
    prompts = [encode_prompt(base.tokenizer, r.messages) for r in requests]
    replies = generate_replies(model, base.tokenizer, prompts, requests[0].params.max_new_tokens, 1, base.device,
                               base.stop_token_ids)
    return [r.text.strip() for r in replies]


def check_mixed_batch(base_path: Path, store: AdapterStore, rows_adapter: str, decode: DecodeSettings) -> list[str]:
    """[base, rows, plain, rows (a second turn: the trained token is in the prompt), plain] in one
    batch: each answer equals its request alone (and, for the token-row adapter, after an eviction
    and reload), the token-row adapter's equal plain peft's, and the others' equal the answers the
    engine gave before it ever loaded the token-row adapter."""
    mixed = [ask("base", "Color of cat"), ask(rows_adapter, "Color of cat"), ask("plain", "Color of bird"),
             ask(rows_adapter, "Color of cat", "red", "Color of queen"), ask("plain", "Color of king", "blue", "Color of fish")]
    without = [r for r in mixed if r.adapter != rows_adapter]
    engine = engine_on(base_path, store, decode)
    try:
        before = [r.text for r in engine.generate(without)]  # the token-row adapter not yet loaded
        together = engine.generate(mixed)
        alone = [engine.generate([r])[0] for r in mixed]
        assert engine.evict(rows_adapter)  # back from host memory, its rows with it
        again = engine.generate([r for r in mixed if r.adapter == rows_adapter])
        assert not any(type(m).__name__ == "TrainableTokensWrapper" for m in engine.base.model.modules())
    finally:
        engine.close()
    assert all(r.error is None for r in together), together
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.text for r in again] == [r.text for r in together if r.adapter == rows_adapter]
    assert [r.text for r in together if r.adapter != rows_adapter] == before
    own = [r for r in mixed if r.adapter == rows_adapter]
    assert [r.text for r in together if r.adapter == rows_adapter] == plain_peft(base_path, store.path(rows_adapter), own)
    return [r.text for r in together]


@pytest.mark.slow
@pytest.mark.parametrize("decode", [DecodeSettings(), DecodeSettings(deterministic=True)], ids=["default", "deterministic"])
def test_the_trained_stop_rows_serve_per_request(stop_adapters, never_stops, tmp_path, decode):
    _, trained = stop_adapters
    store = AdapterStore(tmp_path / "store")
    shutil.copytree(trained.path("colors"), tmp_path / "copy")
    with store.write("colors") as folder:
        for file in (tmp_path / "copy").iterdir():
            shutil.copy(file, folder / file.name)
    save_random_adapter(store, "plain", never_stops, seed=3)
    answers = check_mixed_batch(never_stops, store, "colors", decode)
    assert answers[1] == "red" and answers[3] == "green"  # stopped at the end of turn, right


def token_row_adapter(base_path: Path, folder: Path, token_indices, seed: int = 7) -> Path:
    """A LoRA with random A and B and random trained rows for `token_indices` (not a no-op)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        trainable_token_indices=token_indices)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "trainable_tokens_delta" in name:
            param.data = 3 * torch.randn_like(param)  # large: these tokens' logits move
    peft_model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("base_name", ["untied", "tied"])
@pytest.mark.parametrize("decode", [DecodeSettings(), DecodeSettings(deterministic=True)], ids=["default", "deterministic"])
def test_random_token_rows_act_on_their_own_rows_only(base_name, decode, tiny_base, never_stops, tmp_path):
    """Random rows on an untied base (output rows only) and a tied one (one row, input and output:
    'cat' ends a prompt, so its input row decides the reply)."""
    base_path = tiny_base if base_name == "untied" else never_stops
    base = load_base(BaseConfig(str(base_path)))
    eos, word = base.tokenizer.eos_token_id, base.tokenizer("Color of cat", add_special_tokens=False)["input_ids"][-1]
    indices = {"lm_head": [eos, word]} if base_name == "untied" else [eos, word]
    store = AdapterStore(tmp_path / "store")
    with store.write("rows") as folder:
        token_row_adapter(base_path, tmp_path / "made", indices)
        for file in (tmp_path / "made").iterdir():
            shutil.copy(file, folder / file.name)
    save_random_adapter(store, "plain", base_path, seed=3)
    check_mixed_batch(base_path, store, "rows", decode)


def test_a_static_decode_step_with_token_rows_reads_nothing_back_and_keeps_its_signature(tiny_base, tmp_path):
    """What a CUDA graph needs of the gathered token rows (the default decode), checked on the CPU:
    a decode step over a mix of rows reads no value back to the host (a capture would fail), and
    another mix of the same adapters has the same step signature and buffers, so the captured
    graph is replayed for it and reads that mix's indices from the fixed buffer."""
    from bench.decode_graph import HostSyncs, StaticDecode

    base = load_base(BaseConfig(str(tiny_base)))
    store = AdapterStore(tmp_path / "store")
    with store.write("rows") as folder:
        token_row_adapter(tiny_base, tmp_path / "made", {"lm_head": [base.tokenizer.eos_token_id, 10]})
        for file in (tmp_path / "made").iterdir():
            shutil.copy(file, folder / file.name)
    save_random_adapter(store, "plain", tiny_base, seed=3)
    engine = engine_on(tiny_base, store, DecodeSettings())
    try:
        rows, plain = (engine.registry.resolve(n) for n in ("rows", "plain"))
        engine.make_resident([rows, plain])
        ids = torch.tensor([[base.tokenizer.bos_token_id, 40, 41, 42]] * 3)
        state = StaticDecode.prefill(engine.route([rows.key, None, plain.key]), ids, 4)
        signature = engine.step_signature()
        engine.router.lora_add = None  # the torch ops a GPU runs, not the CPU kernel
        with HostSyncs() as reads:
            state.step()
        assert reads.seen == [] and signature[0] == engine.router.signature() + ("token rows",)
        engine.route([None, rows.key, rows.key])
        assert engine.step_signature() == signature
    finally:
        engine.close()


class Toy(torch.nn.Module):
    """An embedding and an output head, tied or not: what TokenRowRouter hooks."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


@pytest.mark.parametrize("per_row", [False, True], ids=["gathered", "per-row"])
@torch.no_grad()
def test_each_row_gets_its_own_adapter_s_rows_and_the_others_the_base_s_bit_for_bit(per_row):
    from adapters.compat import TokenRows, TokenRowSet
    from serve.token_rows import TokenRowRouter

    torch.manual_seed(0)
    model = Toy(tied=True)
    x = TokenRows(TokenRowSet((3, 7), torch.randn(2, 8)), TokenRowSet((3, 7), torch.randn(2, 8)))
    y = TokenRows(output=TokenRowSet((7, 9), torch.randn(2, 8)))
    router = TokenRowRouter(model, per_row=per_row)
    router.add("x", x), router.add("y", y), router.add("plain", TokenRows())
    router.rebuild(["x", "plain", "y"])
    ids = torch.randint(10, 50, (4, 5))
    ids[1, 2] = ids[0, 2] = 3  # x's input token, in a row on x and in a row on the base
    router.set_rows([None] * 4)
    plain = model(ids)
    router.set_rows([None, "x", "plain", "y"])
    assert router.signature() == (("token rows", (0, 1, 0, 2)) if per_row else ("token rows",))
    routed = model(ids)
    assert torch.equal(routed[0], plain[0]) and torch.equal(routed[2], plain[2])
    embed = lambda row: torch.nn.functional.embedding(row, model.embed.weight)  # noqa: E731 (the hooks left out)
    hidden = torch.tanh(embed(ids[1]))
    hidden[2] = torch.tanh(x.input.rows[0])
    want = hidden @ model.head.weight.t()
    want[:, [3, 7]] = hidden @ x.output.rows.t()
    assert torch.allclose(routed[1], want, atol=1e-6)
    want = plain[3].clone()
    want[:, [7, 9]] = torch.tanh(embed(ids[3])) @ y.output.rows.t()
    assert torch.allclose(routed[3], want, atol=1e-6)
    router.set_rows(["plain", None, "plain", None])  # no row on token rows: nothing is computed
    assert router.signature() == () and torch.equal(model(ids), plain)


# -- 4. registration refuses token rows that do not fit -------------------------------------------

@pytest.fixture(scope="module")
def good_rows(tiny_base, tmp_path_factory) -> Path:
    return token_row_adapter(tiny_base, tmp_path_factory.mktemp("rows") / "good", {"lm_head": [3, 10]})


def tiny_shape(tiny_base) -> BaseShape:
    from adapters.base import base_fingerprint

    return BaseShape.of(AutoModelForCausalLM.from_pretrained(tiny_base), base_fingerprint(str(tiny_base)))


def altered(good: Path, folder: Path, config: dict | None = None, tensors=None) -> Path:
    shutil.copytree(good, folder)
    if config is not None:
        saved = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**saved, **config}))
    if tensors is not None:
        weights = load_file(folder / "adapter_model.safetensors")
        save_file(tensors(weights), folder / "adapter_model.safetensors")
    return folder


KEY = "base_model.model.lm_head" + TOKEN_ROWS_SUFFIX


def _set(weights: dict, key: str, value: torch.Tensor) -> dict:
    return {**weights, key: value}


BAD_ROWS = {
    "not finite": (None, lambda w: _set(w, KEY, torch.full_like(w[KEY], float("nan"))), "NaN or inf.*token_adapter"),
    "wrong shape": (None, lambda w: _set(w, KEY, torch.zeros(3, 64)), r"lm_head: token rows \[3, 64\], expected \[2, 64\]"),
    "outside the vocabulary": ({"trainable_token_indices": {"lm_head": [3, 100000]}}, None,
                               r"token ids \[100000\] are outside the base's vocabulary of 384"),
    "not an embedding": ({"trainable_token_indices": {"q_proj": [3, 10]}}, None,
                         "names 'q_proj', which is neither the base's input embedding"),
    "no rows": ({"trainable_token_indices": {"lm_head": [3, 10], "embed_tokens": [3]}}, None,
                "names model.embed_tokens, but the weights hold no token rows for it"),
    "rows not named": ({"trainable_token_indices": None}, None, "has no trainable_token_indices"),
    "repeated ids": ({"trainable_token_indices": {"lm_head": [3, 3]}}, None, r"repeats token ids: \[3, 3\]"),
}


def test_good_token_rows_register(good_rows, tiny_base):
    assert check_adapter(good_rows, tiny_shape(tiny_base)).token_row_shapes == {"lm_head": (2, 64)}


def test_the_engine_reads_a_token_row_adapter_s_file_once_and_gets_what_each_reader_gives(good_rows, tiny_base,
                                                                                          monkeypatch):
    from adapters import compat
    from adapters.weights import read_adapter_weights
    from serve.engine import read_adapter
    from serve.registry import AdapterEntry

    shape = tiny_shape(tiny_base)
    lora, rows = read_adapter_weights(good_rows), compat.read_token_rows(good_rows, shape)
    opened, real = [], compat.safe_open
    monkeypatch.setattr(compat, "safe_open", lambda path, **kw: opened.append(path) or real(path, **kw))
    got_lora, got_rows = read_adapter(AdapterEntry("good", good_rows, None, 8), shape)
    assert opened == [str(good_rows / "adapter_model.safetensors")]
    assert got_lora.modules() == lora.modules() and len(lora.modules()) > 0
    assert all(torch.equal(got_lora.pairs[m].A, p.A) and torch.equal(got_lora.pairs[m].B, p.B)
               and got_lora.pairs[m].scale == p.scale for m, p in lora.pairs.items())
    assert rows.input is None and got_rows.input is None and got_rows.output.token_ids == rows.output.token_ids == (3, 10)
    assert torch.equal(got_rows.output.rows, rows.output.rows)


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_token_rows_that_do_not_fit_are_refused_with_the_reason(case, good_rows, tiny_base, tmp_path):
    config, tensors, reason = BAD_ROWS[case]
    with pytest.raises(AdapterCheckError, match=reason):
        check_adapter(altered(good_rows, tmp_path / case, config, tensors), tiny_shape(tiny_base))
