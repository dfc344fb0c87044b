"""Regional compilation (train/compiled.py, `--compile`): the compiled blocks train as the eager
ones do, one graph serves every block, and evals and generation stay eager."""

from __future__ import annotations

import pytest
import torch

from tests.test_fused_lora import IDS, assert_close, lora_model, loss_and_grads
from train.compiled import compile_blocks, decoder_blocks, uncompile_blocks
from train.config import config_from_args
from train.loop import enable_checkpointing, use_compile


class CountingBackend:
    """A torch.compile backend that runs graphs eagerly, counts those it was handed and the runs
    of them, and keeps their code."""

    def __init__(self):
        self.graphs = self.runs = 0
        self.code: list[str] = []

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        self.code.append(graph_module.code)

        def run(*args):
            self.runs += 1
            return graph_module.forward(*args)

        return run


@pytest.mark.slow
def test_compiled_blocks_give_eager_loss_and_gradients(tiny_base):
    model = lora_model(tiny_base, quantize=True)
    enable_checkpointing(model)
    model.enable_input_require_grads()
    expected = loss_and_grads(model)
    assert compile_blocks(model) == model.config.num_hidden_layers  # inductor, as `--compile` runs it
    assert_close(expected, loss_and_grads(model), rtol=1e-4)
    assert uncompile_blocks(model) == model.config.num_hidden_layers
    assert all("forward" not in block.__dict__ for block in decoder_blocks(model))


@pytest.mark.slow
def test_one_graph_serves_every_block_and_evals_stay_eager(tiny_base):
    model = lora_model(tiny_base, quantize=True)
    model.enable_input_require_grads()  # else block 0's input alone needs no grad: a second graph, for it
    backend = CountingBackend()
    compile_blocks(model, backend=backend)
    loss_and_grads(model)
    assert backend.graphs == 1, "each block compiled apart"  # the same code and shapes in every block
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
        model.generate(input_ids=IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert backend.graphs == 1  # no new graphs: eval forwards and generation ran eagerly
    uncompile_blocks(model)
    loss_and_grads(model)
    assert backend.graphs == 1  # after uncompile_blocks, training is eager again


@pytest.mark.slow
def test_checkpoint_stays_outside_the_compiled_graph(tiny_base):
    """Traced into the graph, the checkpoint cost 4.7 GB more peak memory on an H100 (8B shape):
    the compiled forward runs inside transformers' checkpoint instead, once in the forward pass
    and once more when the backward pass recomputes it."""
    model = lora_model(tiny_base, quantize=True)
    enable_checkpointing(model)
    model.enable_input_require_grads()
    backend = CountingBackend()
    compile_blocks(model, backend=backend)
    loss_and_grads(model)
    assert backend.graphs == 1
    assert not any("checkpoint" in code for code in backend.code), "the checkpoint was traced into the graph"
    assert backend.runs == 2 * model.config.num_hidden_layers  # each block: forward, then its recompute
    uncompile_blocks(model)


def test_compiled_blocks_are_the_default_on_a_gpu_only(tiny_base):
    """Measured: 1.63x the Trainer compiled against 1.19x eager on an H100; on the CPU the demo's
    short runs did not earn their compilation back (docs/performance.md)."""
    from types import SimpleNamespace

    model = lora_model(tiny_base, quantize=True)
    assert not use_compile(None, model) and use_compile(True, model)
    on_gpu = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda"))]))
    assert use_compile(None, on_gpu) and not use_compile(False, on_gpu)
    flags = {(): None, ("--compile",): True, ("--no-compile",): False}
    assert {k: config_from_args(["--name", "x", "--data", "d.jsonl", *k]).compile for k in flags} == flags
