"""The static cache's decode step (serve/slots.py), as bench/decode_graph.py runs it alone.

The capture itself needs a GPU; what makes it correct does not: the steps must give the tokens
transformers' own generate gives, for the base, one adapter and a mix of adapters, and a step
must read nothing back to the host (a capture fails on such a read).
"""

from __future__ import annotations

import pytest
import torch

from bench.decode_graph import HostSyncs, StaticDecode, eager_decode, static_decode
from bench.routing import restacked
from tests.conftest import new_engine

ROWS = {"base": [None, None], "one adapter": ["a", "a"], "two adapters": ["a", "b"]}


@pytest.fixture(scope="module")
def engine(served, tiny_base):
    _, _, registry = served
    engine = new_engine(tiny_base, registry)
    engine.make_resident([registry.resolve("a"), registry.resolve("b")])
    return engine


def rows_model(engine, names):
    keys = [None if n is None else engine.registry.resolve(n).key for n in names]
    return engine.route(keys)


def prompt(engine) -> torch.Tensor:
    bos = engine.base.tokenizer.bos_token_id
    return torch.tensor([[bos, 40, 41, 42, 43], [bos, 50, 51, 52, 53]])


@pytest.mark.slow
@pytest.mark.parametrize("case", ROWS)
def test_static_cache_steps_give_generates_tokens(engine, case):
    ids = prompt(engine)
    with torch.no_grad():
        reference = rows_model(engine, ROWS[case]).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
            pad_token_id=engine.base.tokenizer.pad_token_id)[:, ids.shape[1]:]
    assert torch.equal(eager_decode(rows_model(engine, ROWS[case]), ids, 8), reference)


@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "shared-inputs"])
@pytest.mark.parametrize("case", ROWS)
def test_a_decode_step_reads_nothing_back_to_the_host(engine, case, shared):
    # with True, q/k/v and gate/up share their products, as on a GPU
    with restacked(engine.router, group_inputs=shared) as router:
        state = StaticDecode.prefill(rows_model(engine, ROWS[case]), prompt(engine), 4)
        router.lora_add = None  # the torch ops a GPU runs, not the CPU kernel
        with HostSyncs() as reads:
            state.step()
        assert reads.seen == []
    # The detector is live: a value read inside it is caught.
    with HostSyncs() as reads:
        bool(state.slots.positions.sum() > 0)
    assert reads.seen


def test_static_decode_times_its_steps_and_refuses_graphs_on_the_cpu(engine):
    ids = prompt(engine)
    run = static_decode(rows_model(engine, ROWS["two adapters"]), ids, 6, graph=False)
    assert run.tokens.shape == (2, 6) and run.steps_per_s > 0
    with pytest.raises(ValueError, match="CUDA"):
        static_decode(rows_model(engine, ROWS["base"]), ids, 6, graph=True)
