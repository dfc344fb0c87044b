"""`python -m serve vllm`: the launch command, and vLLM's LoRA constraints checked per adapter."""

from __future__ import annotations

import shlex

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from adapters import AdapterStore
from adapters.compat import base_shape_from_config
from serve.__main__ import main as serve_main
from serve.registry import AdapterRegistry
from serve.vllm import max_lora_rank, vllm_plan
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


def test_the_command_lists_every_adapter_vllm_can_serve_and_says_why_not_for_the_rest(tmp_path, tiny_base):
    store = _store(tmp_path, tiny_base)
    registry = AdapterRegistry(store, base_shape_from_config(str(tiny_base)))
    registry.refresh()
    assert [e.name for e in registry.servable()] == ["a", "b", "c-patterns"]  # servable here, not by vLLM
    plan = vllm_plan(str(tiny_base), store, registry.servable(), port=8123)
    argv = shlex.split(plan.shell())
    assert argv[:3] == ["vllm", "serve", str(tiny_base)]
    assert argv[argv.index("--max-lora-rank") + 1] == "8"  # the adapters are rank 4: the smallest value vLLM allows
    assert argv[argv.index("--port") + 1] == "8123" and "--enable-lora" in argv
    assert argv[argv.index("--lora-modules") + 1 :] == [f"a={store.path('a')}", f"b={store.path('b')}"]
    assert "per-module rank" in plan.excluded["c-patterns"]


def test_rank_limits_and_unsupported_targets_are_named():
    assert [max_lora_rank([r]) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]


def test_cli_prints_the_command_without_loading_weights(tmp_path, tiny_base, capsys):
    store = _store(tmp_path, tiny_base)
    assert serve_main(["--base", str(tiny_base), "--adapters", str(store.root), "vllm"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("vllm serve ") and "--lora-modules" in out
    assert "left out c-patterns" in err
