"""A store full of malformed entries: each is one rejection naming its problem, and the rest serve.

Every entry below would, before being checked at registration, either be listed as servable and
fail inside the shared decode step, or make `refresh()` raise and stop the whole store.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapters import FALLBACK_CHAT_TEMPLATE, AdapterStore, BaseConfig, BaseShape, Message, load_base
from serve.engine import ChatRequest
from serve.__main__ import main as serve_main
from serve.registry import AdapterRegistry, name_problem
from tests.conftest import save_random_adapter

GOOD = ("good-1", "good-2")
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# -- ways to damage a copy of a good adapter --------------------------------------------------

def set_config(**changes):
    def damage(folder: Path, ctx: dict) -> None:
        config = json.loads((folder / CONFIG).read_text())
        config.update(changes)
        (folder / CONFIG).write_text(json.dumps(config))  # json writes float('nan') as NaN, as Python reads it
    return damage


def write(file: str, text: str):
    def damage(folder: Path, ctx: dict) -> None:
        (folder / file).write_text(text)
    return damage


def edit_tensors(edit):
    def damage(folder: Path, ctx: dict) -> None:
        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS)
    return damage


def first(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if k.endswith(part))[0]


def poison(value: float):
    def edit(tensors: dict) -> None:
        tensors[first(tensors, "lora_B.weight")][0, 0] = value
    return edit


def truncate(folder: Path, ctx: dict) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def other_base_name(folder: Path, ctx: dict) -> None:
    # Same shapes (a copy of an adapter on the served base), so only the recorded base name can tell.
    set_config(base_model_name_or_path=str(ctx["other_base"]))(folder, ctx)


def card(**base_changes) -> dict:
    base = {"path": "models/demo-base", "fingerprint": "", "architecture": "LlamaForCausalLM", "quantization": "none",
            **base_changes}
    return {"name": "x", "task": "t", "created_at": "", "versions": {}, "metric": None, "base": base,
            "lora": {"r": 4, "alpha": 8, "dropout": 0, "target_modules": ["all-linear"], "last_layers": None,
                     "trainable_params": 1, "total_params": 2},
            "dataset": {"path": "", "sha256": "", "bytes": 0, "train_examples": 0, "eval_examples": 0, "eval_source": ""},
            "training": {"epochs": 1, "steps": 1, "learning_rate": 1, "batch_size": 1, "max_length": 1, "seed": 0,
                         "duration_s": 0, "tokens_per_s": 0, "train_loss": 0, "eval_loss": 0}}


# name -> (damage to a copy of a good adapter, a word the rejection must contain)
DAMAGED = {
    "config-list": (write(CONFIG, "[1, 2]"), "must be a JSON object, not a list"),
    "config-string": (write(CONFIG, '"lora"'), "must be a JSON object, not a string"),
    "config-null": (write(CONFIG, "null"), "must be a JSON object, not null"),
    "r-zero": (set_config(r=0), "r must be a positive integer, got 0"),
    "r-negative": (set_config(r=-5), "got -5"),
    "r-word": (set_config(r="sixteen"), "got 'sixteen'"),
    "r-bool": (set_config(r=True), "got True"),
    "r-float": (set_config(r=3.5), "got 3.5"),
    "r-disagrees": (set_config(r=8), "gives r=8 but the tensors disagree"),
    "rank-pattern-disagrees": (set_config(rank_pattern={"q_proj": 2}), "with a rank_pattern but the tensors disagree"),
    "alpha-nan": (set_config(lora_alpha=float("nan")), "lora_alpha must be a finite positive number, got nan"),
    "alpha-word": (set_config(lora_alpha="x"), "lora_alpha must be a finite positive number, got 'x'"),
    "target-unknown": (set_config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj", "wq_nonexistent"]), "['wq_nonexistent'] match no linear layer"),
    "target-too-narrow": (set_config(target_modules=["q_proj"]), "which target_modules does not select"),
    "target-wrong-type": (set_config(target_modules=7), "target_modules must be"),
    "weights-nan": (edit_tensors(poison(float("nan"))), "NaN or inf"),
    "weights-inf": (edit_tensors(poison(float("inf"))), "NaN or inf"),
    "weights-int": (edit_tensors(lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()})), "floating point"),
    "missing-lora-b": (edit_tensors(lambda t: t.pop(first(t, "lora_B.weight"))), "has lora_A but no lora_B"),
    "b-rank-differs": (edit_tensors(lambda t: t.update({first(t, "lora_B.weight"): torch.ones(64, 3)})),
                       "lora_B has rank 3"),
    "full-layer-weight": (edit_tensors(lambda t: t.update({"base_model.model.model.embed_tokens.weight": torch.ones(4, 4)})),
                          "not LoRA A/B matrices"),
    "unknown-module": (edit_tensors(lambda t: t.update({f"base_model.model.model.extra.lora_{p}.weight": torch.ones(4, 4)
                                                         for p in "AB"})), "model.extra, which the base does not have"),
    "truncated": (truncate, "not a readable safetensors"),
    "pickle-beside": (write("adapter_model.bin", "\x80\x04pickle"), "pickled weights"),
    "template-raises": (write("chat_template.jinja", "{{ raise_exception('no chat here') }}"), "no chat here"),
    "template-syntax": (write("chat_template.jinja", "{% for m in messages %}{{ m.content }}"), "TemplateSyntaxError"),
    "template-drops-user": (write("chat_template.jinja", "{{ bos_token }}hello"), "without the user's message"),
    "card-invalid-json": (write("card.json", "{"), "card.json is not valid JSON"),
    "card-list": (write("card.json", "[]"), "card.json must be a JSON object, not a list"),
    "card-base-string": (write("card.json", json.dumps({**card(), "base": "elsewhere"})), "not an adapter card"),
    "no-card-other-base": (other_base_name, "base_model_name_or_path"),
}


def empty_folder(root: Path, name: str, good: Path, ctx: dict) -> None:
    (root / name).mkdir()


def plain_file(root: Path, name: str, good: Path, ctx: dict) -> None:
    (root / name).write_text("not an adapter")


def link_outside(root: Path, name: str, good: Path, ctx: dict) -> None:
    outside = shutil.copytree(good, root.parent / "outside-the-store")
    (root / name).symlink_to(outside, target_is_directory=True)


def dangling_link(root: Path, name: str, good: Path, ctx: dict) -> None:
    (root / name).symlink_to(root / ".versions" / name / "gone", target_is_directory=True)


def copy_of_good(root: Path, name: str, good: Path, ctx: dict) -> None:
    shutil.copytree(good, root / name)


# entry name -> (how the entry is made, a word its rejection must contain)
ENTRIES = {
    **{name: (lambda root, name, good, ctx, damage=damage: (copy_of_good(root, name, good, ctx), damage(root / name, ctx)),
              word) for name, (damage, word) in DAMAGED.items()},
    "empty": (empty_folder, "empty folder"),
    "plain-file": (plain_file, "a file, not a folder"),
    "link-outside": (link_outside, "outside the store"),
    "link-dangling": (dangling_link, "does not exist"),
    "base": (copy_of_good, "'base' is reserved"),
    "x..y": (copy_of_good, "contains '..'"),
    "-dash": (copy_of_good, "starts with '-'"),
    "a@b": (copy_of_good, "contains ['@']"),
    "back\\slash": (copy_of_good, "path separator"),
    "n" * 65: (copy_of_good, "65 characters long"),
}


@pytest.fixture(scope="module")
def shape(served) -> BaseShape:
    _, base, _ = served
    return BaseShape.of(base.model, base.fingerprint)


def hostile_store(root: Path, served, other_base, names) -> AdapterStore:
    store, _, _ = served
    target = AdapterStore(root)
    target.root.mkdir(parents=True)
    for good_name, source in zip(GOOD, ("a", "b")):
        shutil.copytree(store.path(source).resolve(), target.root / good_name)
    good = store.path("c").resolve()
    for name in names:
        make, _ = ENTRIES[name]
        make(target.root, name, good, {"other_base": other_base})
    return target


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_each_malformed_entry_is_one_rejection_naming_its_problem(name, tmp_path, served, other_base, shape):
    registry = AdapterRegistry(hostile_store(tmp_path / "store", served, other_base, [name]), shape)
    changes = registry.refresh()  # must not raise
    reasons = {r.name: r.reason for r in registry.rejected()}
    assert set(reasons) == {name} and changes.rejected == [name]
    assert ENTRIES[name][1] in reasons[name], reasons[name]
    assert [e.name for e in registry.servable()] == list(GOOD)


def test_an_unforeseen_error_is_logged_and_becomes_that_entry_s_rejection(tmp_path, served, other_base, shape, monkeypatch, caplog):
    import serve.registry

    real = serve.registry.check_adapter

    def check(folder, base):
        if folder.name == "config-list":  # a hand-dropped folder: its name is the folder's
            raise RuntimeError("a defect nobody foresaw")
        return real(folder, base)

    monkeypatch.setattr(serve.registry, "check_adapter", check)
    registry = AdapterRegistry(hostile_store(tmp_path / "store", served, other_base, ["config-list"]), shape)
    with caplog.at_level(logging.ERROR, logger="serve.registry"):
        registry.refresh()
    assert [(r.name, r.reason) for r in registry.rejected()] == [("config-list", "could not be checked: RuntimeError: a defect nobody foresaw")]
    assert any(record.exc_info for record in caplog.records)  # with its traceback
    assert [e.name for e in registry.servable()] == list(GOOD)


def test_a_refused_folder_is_checked_again_once_its_files_change(tmp_path, served, other_base, shape):
    """A folder copied in by hand is seen half-copied first; it must not stay refused."""
    registry = AdapterRegistry(hostile_store(tmp_path / "store", served, other_base, ["empty"]), shape)
    registry.refresh()
    assert [r.name for r in registry.rejected()] == ["empty"]
    assert registry.refresh().rejected == []  # unchanged: not checked (nor reported) again
    for file in (CONFIG, WEIGHTS):
        shutil.copy(served[0].path("c") / file, tmp_path / "store" / "empty" / file)
    assert registry.refresh().added == ["empty"] and registry.rejected() == []


def test_names_get_their_own_reasons_even_where_the_store_lists_none(tmp_path):
    assert "starts with '.'" in name_problem(tmp_path, ".hidden")
    assert "path separator" in name_problem(tmp_path, "a/b")
    (tmp_path / "fine").mkdir()
    assert name_problem(tmp_path, "fine") is None


@pytest.mark.slow
def test_serve_list_prints_the_good_adapters_and_every_rejection(tmp_path, served, other_base, tiny_base, capsys, shape):
    store = hostile_store(tmp_path / "store", served, other_base, sorted(ENTRIES))
    assert serve_main(["--base", str(tiny_base), "--adapters", str(store.root), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    for name in GOOD:
        assert "REJECTED" not in rows[name] and rows[name].split()[2] == "4"  # the rank column
    for name, (_, word) in ENTRIES.items():
        assert "REJECTED: " in rows[name] and word in rows[name], (name, rows.get(name))
    # hot reload keeps working past the malformed entries: a new adapter is picked up
    registry = AdapterRegistry(store, shape)
    registry.refresh()
    shutil.copytree(served[0].path("d").resolve(), store.root / "good-3")
    assert registry.refresh().added == ["good-3"]


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("Color of cat?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_the_checks_pass_really_load_in_peft_and_change_the_logits(tmp_path, tiny_base, served, shape):
    """The checks are not over-strict: a plain adapter, one with a rank_pattern, one with the chat
    template training saves, one whose config spells the base's path differently, and one whose
    card's fingerprint vouches for a base_model_name_or_path that names another folder all serve."""
    _, base, _ = served
    store = AdapterStore(tmp_path / "store")
    save_random_adapter(store, "plain", tiny_base, seed=31)
    torch.manual_seed(32)
    patterned = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                               LoraConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3},
                                          target_modules="all-linear", init_lora_weights=False))
    save_random_adapter(store, "patterned", tiny_base, seed=32, model=patterned)
    for name in ("templated", "relative", "carded"):
        shutil.copytree(store.path("plain").resolve(), store.root / name)
    (store.root / "templated" / "chat_template.jinja").write_text(FALLBACK_CHAT_TEMPLATE)
    set_config(base_model_name_or_path=f"models/{Path(tiny_base).name}/")(store.root / "relative", {})
    set_config(base_model_name_or_path="somewhere/else")(store.root / "carded", {})
    (store.root / "carded" / "card.json").write_text(json.dumps(card(fingerprint=base.fingerprint)))

    registry = AdapterRegistry(store, shape)
    registry.refresh()
    assert registry.rejected() == []
    servable = {e.name: e for e in registry.servable()}
    assert sorted(servable) == ["carded", "patterned", "plain", "relative", "templated"]
    assert servable["carded"].card is not None and servable["plain"].card is None
    reference = _logits(AutoModelForCausalLM.from_pretrained(tiny_base), base.tokenizer)
    for name in ("plain", "patterned"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(servable[name].path))
        logits = _logits(model.eval(), base.tokenizer)
        assert torch.isfinite(logits).all()
        assert (logits - reference).abs().max() > 1e-3  # not a no-op adapter


def test_a_template_that_refuses_a_system_turn_serves_and_says_so_per_request(tmp_path, tiny_base, served, shape):
    """Gemma's templates raise on a system message: that is the template's rule, not a broken
    adapter. It registers; a request with a system turn gets the template's own words as a
    request error, and one without is answered."""
    from serve.engine import Engine, RequestError
    from serve.slots import DecodeSettings
    from tests.conftest import request

    store = AdapterStore(tmp_path / "store")
    save_random_adapter(store, "strict", tiny_base, seed=33)
    template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}<|{{ m.role }}|> {{ m.content }}</s>{% endfor %}<|assistant|>")
    (store.path("strict").resolve() / "chat_template.jinja").write_text(template)
    registry = AdapterRegistry(store, shape)
    registry.refresh()
    assert [e.name for e in registry.servable()] == ["strict"]
    engine = Engine(load_base(BaseConfig(str(tiny_base))), registry, decode=DecodeSettings(deterministic=True))
    try:
        with pytest.raises(RequestError, match="System role not supported"):
            engine.prepare(ChatRequest("strict", (Message("system", "be brief"), Message("user", "hi"))))
        assert engine.generate([request("strict")], timeout=60)[0].error is None
    finally:
        engine.close()


def test_the_server_starts_and_serves_beside_every_malformed_entry(tmp_path, served, other_base, tiny_base):
    """`serve web`'s start-up (Service.start: scan, watch) and a live request, with all of them present."""
    import httpx

    from serve.server import AccessConfig
    from tests.conftest import LiveServer, free_port, start_service

    store = hostile_store(tmp_path / "store", served, other_base, sorted(ENTRIES))
    service = start_service(tiny_base, store)
    with LiveServer(service, AccessConfig(port=free_port())) as server:
        models = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": GOOD[0], "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        rejected = {r.name for r in service.registry.rejected()}
    assert sorted(m["id"] for m in models) == sorted(["base", *GOOD])
    assert reply.status_code == 200, reply.text
    assert rejected == set(ENTRIES)
