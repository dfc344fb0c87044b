"""`python -m serve vllm`: the launch command, vLLM's LoRA rules checked per adapter, and the two
hand-off forms (the `--lora-modules` JSON list, the filesystem resolver's folder)."""

from __future__ import annotations

import json
import os
import shlex
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from adapters import AdapterStore
from adapters.compat import base_shape_from_config
from serve.__main__ import main as serve_main
from serve.registry import AdapterRegistry
from serve.vllm import (COPIES, adapter_config_problems, max_lora_rank, peft_config_problems, vllm_plan,
                        write_lora_modules, write_resolver_layout)
from tests.conftest import save_random_adapter


def _store(tmp_path, tiny_base) -> AdapterStore:
    store = AdapterStore(tmp_path / "store")
    save_random_adapter(store, "a", tiny_base, seed=1)
    save_random_adapter(store, "b", tiny_base, seed=2)
    # Per-module ranks: the engine pads them, vLLM refuses them.
    torch.manual_seed(3)
    patterns = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                              LoraConfig(r=4, rank_pattern={"q_proj": 2}, target_modules="all-linear", init_lora_weights=False))
    save_random_adapter(store, "c-patterns", tiny_base, seed=3, model=patterns)
    return store


def _registry(store: AdapterStore, base: str) -> AdapterRegistry:
    registry = AdapterRegistry(store, base_shape_from_config(base))
    registry.refresh()
    return registry


def _plan(store: AdapterStore, base: str, **kwargs):
    return vllm_plan(base, store, _registry(store, base).servable(), **kwargs)


def vllm_resolves(folder, name: str, base: str) -> bool:
    """What vLLM's FilesystemResolver does for a request naming `name` on `base`
    (vllm/plugins/lora_resolvers/filesystem_resolver.py): the real path must stay inside the
    folder, and its adapter_config.json must say LORA and name the base exactly."""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root or not os.path.exists(os.path.join(path, "adapter_config.json")):
        return False
    config = json.loads(open(os.path.join(path, "adapter_config.json")).read())
    return config["peft_type"] == "LORA" and config["base_model_name_or_path"] == base


def test_the_command_lists_every_adapter_vllm_can_serve_and_says_why_not_for_the_rest(tmp_path, tiny_base):
    store = _store(tmp_path, tiny_base)
    registry = _registry(store, str(tiny_base))
    assert [e.name for e in registry.servable()] == ["a", "b", "c-patterns"]  # servable here, not by vLLM
    plan = vllm_plan(str(tiny_base), store, registry.servable(), port=8123)
    argv = shlex.split(plan.shell())
    assert argv[:3] == ["vllm", "serve", str(tiny_base)]
    assert argv[argv.index("--max-lora-rank") + 1] == "8"  # the adapters are rank 4: the smallest value vLLM allows
    assert argv[argv.index("--port") + 1] == "8123" and "--enable-lora" in argv
    modules = [json.loads(item) for item in argv[argv.index("--lora-modules") + 1 :]]
    assert modules == [{"name": n, "path": str(store.path(n)), "base_model_name": str(tiny_base)} for n in ("a", "b")]
    # vLLM parses an item holding '=' and no ',' as name=path; JSON always has its commas.
    assert all("," in item for item in argv[argv.index("--lora-modules") + 1 :])
    assert "rank_pattern" in plan.excluded["c-patterns"]


def test_every_servable_adapter_validates_or_is_left_out_with_its_reason(tmp_path, tiny_base):
    store = _store(tmp_path, tiny_base)
    registry = _registry(store, str(tiny_base))
    plan = vllm_plan(str(tiny_base), store, registry.servable())
    for entry in registry.servable():
        problems = adapter_config_problems(entry.path, str(tiny_base))
        assert (entry.name in plan.modules) == (not problems) == (entry.name not in plan.excluded), (entry.name, problems)
    assert sorted(plan.modules) == ["a", "b"] and list(plan.excluded) == ["c-patterns"]


@pytest.mark.parametrize("change, field", [
    ({"r": 600}, "r"),  # over 512, the largest --max-lora-rank vLLM allows
    ({"r": 0}, "r"),
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"base_model_name_or_path": "someone/other-base"}, "base_model_name_or_path"),
    ({"bias": "all"}, "bias"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
    ({"target_modules": None}, "target_modules"),  # None: the key is removed
])
def test_a_config_vllm_refuses_is_refused_with_a_reason_naming_the_field(tmp_path, tiny_base, change, field):
    store = AdapterStore(tmp_path / "store")
    save_random_adapter(store, "a", tiny_base, seed=1)
    folder = shutil.copytree(store.path("a").resolve(), tmp_path / "crafted")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert peft_config_problems(config, str(tiny_base)) == []  # as peft wrote it: servable
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    problems = adapter_config_problems(folder, str(tiny_base))
    assert len(problems) == 1 and problems[0].startswith(field), problems


def test_the_base_must_be_named_as_the_adapter_names_it(tmp_path, tiny_base):
    store = _store(tmp_path, tiny_base)
    spelled_otherwise = f"{tiny_base}/"  # the same folder: our registry serves it, vLLM's resolver would not
    plan = _plan(store, spelled_otherwise)
    assert plan.modules == {} and {"a", "b"} <= set(plan.excluded)
    assert "base_model_name_or_path" in plan.excluded["a"] and f"--base {tiny_base}" in plan.excluded["a"]


def test_the_lora_modules_file_parses_with_name_path_and_base(tmp_path, tiny_base):
    store = _store(tmp_path, tiny_base)
    plan = _plan(store, str(tiny_base))
    modules = json.loads(write_lora_modules(tmp_path / "out" / "lora-modules.json", plan).read_text())
    assert [m["name"] for m in modules] == ["a", "b"]
    for module in modules:
        assert set(module) == {"name", "path", "base_model_name"} and module["base_model_name"] == str(tiny_base)
        assert os.path.isabs(module["path"]) and (store.path(module["name"]) / "adapter_config.json").is_file()
    assert [json.loads(item) for item in plan.command[plan.command.index("--lora-modules") + 1 :]] == modules


def test_the_resolver_folder_holds_each_servable_adapter_and_nothing_for_the_refused(tmp_path, tiny_base):
    store = _store(tmp_path, tiny_base)
    versions = {n: store.path(n).resolve() for n in store.names()}
    folder = tmp_path / "loras"
    layout = write_resolver_layout(folder, _plan(store, str(tiny_base)))
    assert sorted(layout.served) == ["a", "b"] and "rank_pattern" in layout.refused["c-patterns"]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["a", "b"]
    for name in ("a", "b"):
        assert (folder / name / "adapter_config.json").is_file() and vllm_resolves(folder, name, str(tiny_base))
        copied = folder / name / "adapter_model.safetensors"
        assert not copied.is_symlink() and copied.read_bytes() == (versions[name] / "adapter_model.safetensors").read_bytes()
    assert not vllm_resolves(folder, "c-patterns", str(tiny_base))
    assert {n: store.path(n).resolve() for n in store.names()} == versions  # the store is untouched


def test_the_resolver_folder_follows_the_store_and_keeps_the_copy_a_running_vllm_read(tmp_path, tiny_base):
    store = _store(tmp_path, tiny_base)
    folder = tmp_path / "loras"
    first = write_resolver_layout(folder, _plan(store, str(tiny_base))).served["a"]
    assert write_resolver_layout(folder, _plan(store, str(tiny_base))).served["a"] == first  # same version: no new copy
    save_random_adapter(store, "a", tiny_base, seed=7)
    store.delete("b")
    (folder / "mine").mkdir()  # someone else's: left alone
    layout = write_resolver_layout(folder, _plan(store, str(tiny_base)))
    second = layout.served["a"]
    assert second != first and (folder / "a").resolve() == second.resolve() and first.is_dir()
    assert layout.removed == ["b"] and not (folder / "b").exists() and not (folder / COPIES / "b").exists()
    assert (folder / "mine").is_dir() and vllm_resolves(folder, "a", str(tiny_base))
    save_random_adapter(store, "a", tiny_base, seed=8)
    third = write_resolver_layout(folder, _plan(store, str(tiny_base))).served["a"]
    assert sorted((folder / COPIES / "a").iterdir()) == sorted([second, third])  # the current one and the one before


def test_a_name_someone_else_put_in_the_folder_is_not_replaced(tmp_path, tiny_base):
    store = _store(tmp_path, tiny_base)
    folder = tmp_path / "loras"
    (folder / "a").mkdir(parents=True)
    layout = write_resolver_layout(folder, _plan(store, str(tiny_base)))
    assert "a" not in layout.served and "not made by this tool" in layout.refused["a"]
    assert list((folder / "a").iterdir()) == [] and sorted(layout.served) == ["b"]


def test_rank_limits_and_unsupported_targets_are_named():
    assert [max_lora_rank([r]) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]


def test_cli_prints_the_command_and_writes_both_forms_without_loading_weights(tmp_path, tiny_base, capsys):
    store = _store(tmp_path, tiny_base)
    out = tmp_path / "vllm"
    assert serve_main(["--base", str(tiny_base), "--adapters", str(store.root), "vllm", "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    assert stdout.startswith("vllm serve ") and "--lora-modules" in stdout
    assert "left out c-patterns" in err and "VLLM_PLUGINS=lora_filesystem_resolver" in err
    assert [m["name"] for m in json.loads((out / "lora-modules.json").read_text())] == ["a", "b"]
    assert (out / "loras" / "a" / "adapter_config.json").is_file() and not (out / "loras" / "c-patterns").exists()
