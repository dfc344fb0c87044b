"""adapters/weights.py reads what peft would load (the same tensors, the same scales as peft's own
layers), and the engine's miss reads its file outside the lock. That the engine's answers with
weights loaded this way equal peft's is test_routing's and test_mixing's (peft as the reference)."""

from __future__ import annotations

import threading

import pytest

from tests.conftest import PROMPTS, new_engine

CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3, "down_proj": 5}),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"o_proj": 1}),
    "no-alpha": dict(r=2),  # lora_alpha absent from the config: peft's default
}


def saved_adapter(tmp_path, tiny_base, kind: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(target_modules="all-linear", init_lora_weights=False, **CONFIGS[kind]))
    folder = tmp_path / kind
    model.save_pretrained(folder)
    if kind == "no-alpha":
        import json

        config = json.loads((folder / "adapter_config.json").read_text())
        del config["lora_alpha"]
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_read_weights_equal_what_peft_loads(tmp_path, tiny_base, kind):
    """Per module: A and B bit for bit, and the scale peft's own layer computes, for rank and
    alpha patterns, rsLoRA and a config without lora_alpha."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from adapters.weights import read_adapter_weights

    folder = saved_adapter(tmp_path, tiny_base, kind)
    weights = read_adapter_weights(folder)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(folder))
    layers = {name: m for name, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert weights.modules() == set(layers)
    for name, layer in layers.items():
        pair = weights.pairs[name]
        assert pair.A.equal(layer.lora_A["default"].weight) and pair.B.equal(layer.lora_B["default"].weight)
        assert pair.scale == layer.scaling["default"], name
        assert pair.rank == layer.r["default"]


def test_non_finite_weights_are_named(tmp_path, tiny_base):
    import torch

    from adapters.weights import read_adapter_weights

    weights = read_adapter_weights(saved_adapter(tmp_path, tiny_base, "plain"))
    module = sorted(weights.modules())[3]
    weights.pairs[module].B[0, 0] = torch.nan
    with pytest.raises(ValueError, match=f"{module}.lora_B.weight holds non-finite values"):
        weights.check_finite()


def test_a_copy_shares_no_storage(tmp_path, tiny_base):
    import torch

    from adapters.weights import read_adapter_weights

    weights = read_adapter_weights(saved_adapter(tmp_path, tiny_base, "plain"))
    copy = weights.to("cpu", torch.bfloat16)
    assert copy.nbytes() * 2 == weights.nbytes()
    assert all(copy.pairs[m].A.data_ptr() != p.A.data_ptr() for m, p in weights.pairs.items())


def test_a_miss_reads_its_file_in_the_requesting_thread(served, tiny_base, monkeypatch):
    """The decode loop never reads an adapter file when the request's own thread could
    (`Engine.prefetch` as the request is queued); the loop only copies the tensors into its stacks."""
    import serve.engine as engine_module
    from adapters import Message
    from serve.engine import ChatRequest, SamplingParams

    _, _, registry = served
    engine = new_engine(tiny_base, registry, max_loaded=2)
    readers: list[str] = []
    real = engine_module.read_adapter

    def recording(entry, base):
        readers.append(threading.current_thread().name)
        return real(entry, base)

    monkeypatch.setattr(engine_module, "read_adapter", recording)
    for name in ("a", "b", "c", "a"):  # c evicts a (to host memory), a comes back from there
        result = engine.generate([ChatRequest(name, (Message("user", PROMPTS[1]),), SamplingParams(max_new_tokens=3))])[0]
        assert result.error is None
    assert readers == [threading.current_thread().name] * 3
    assert engine.loads_from_disk == 3 and engine.residency.snapshot().loads[("a", "host")] == 1
