"""The talk's rank table: reproduced at its precision, and the exact counts agree with peft."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from experiments.params_table import RANKS, SIZES, TALK, idealised_share, real_configs, shape_of, talk_rounding


def test_every_cell_of_the_talks_table_is_reproduced():
    for rank in RANKS:
        for size, talk in zip(SIZES.values(), TALK[rank]):
            assert talk_rounding(idealised_share(rank, size)) == talk, (rank, size)
    assert idealised_share(512, 7e9) == pytest.approx(1.2239, abs=1e-4)


def test_exact_count_matches_peft_on_a_small_llama():
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    shape = shape_of(config)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.lora_params(4) == trainable
    assert shape.total == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_real_architectures_have_their_published_sizes():
    totals = {k: shape_of(c).total / 1e9 for k, c in real_configs().items()}
    assert totals["7B"] == pytest.approx(6.74, abs=0.01)
    assert totals["13B"] == pytest.approx(13.02, abs=0.01)
    assert totals["70B"] == pytest.approx(68.98, abs=0.01)
    assert totals["180B"] == pytest.approx(179.5, abs=1.5)
    # Llama-2 7B at r=8 on all linear layers: 32 blocks x 8 x (7 layers' in + out).
    assert shape_of(real_configs()["7B"]).lora_params(8) == 32 * 8 * (4 * 8192 + 3 * (4096 + 11008))
