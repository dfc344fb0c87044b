"""The benchmark scripts' CPU paths run, so they cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve.routing import SHRINKS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gpu_tiny_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "tiny.json"
    # TRITON_INTERPRET: Triton reads it when it is first imported; with it the bench-only Triton
    # LoRA kernel runs under Triton's interpreter on CPU tensors, so its experiment runs here too.
    env = {**os.environ, "TRITON_INTERPRET": "1"} if not torch.cuda.is_available() else None
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--sizes", "tiny", "--out", str(out), "--workdir", str(tmp_path),
                           "--profile", "--skip", "none"],  # every experiment, so none can rot
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    result = report["shapes"]["tiny"]
    # Every stage and experiment ran: a failure inside one is recorded as an "error" key, not raised.
    assert not list(_errors(result)), list(_errors(result))
    memory, training, serving = result["memory"], result["training"], result["serving"]
    # The 4-bit base holds what the analytic NF4 + double-quant size says, within 2%.
    assert abs(memory["base_parameter_bytes"] / memory["base_analytic_bytes"] - 1) < 0.02
    # Nothing of the shape's base, adapters or engine is still reachable once it is done.
    assert result["left_on_device"]["reachable_bytes"] < 0.05 * memory["base_parameter_bytes"]
    # The training comparison is fair: every side trained the same steps on the same tokens ...
    sides = ("ours_fused", "trainer", "ours_peft_forward", "ours_compiled")
    assert {(training[s]["steps"], training[s]["real_tokens"]) for s in sides} == {(3, 3 * 64)}
    # ... and reached the same eval loss (the fused layers and the compiled blocks reorder float sums only).
    fused, trainer = training["ours_fused"], training["trainer"]
    assert training["ours"] == "ours_fused"  # the CPU's default, whose ratio is printed
    assert abs(fused["eval_loss"] - trainer["eval_loss"]) < 0.01 * trainer["eval_loss"]
    for side in ("ours_peft_forward", "ours_compiled"):
        assert abs(training[side]["eval_loss"] - fused["eval_loss"]) < 1e-4 * trainer["eval_loss"], side
    assert training["tokens_per_s_ratio"] == round(fused["tokens_per_s"] / trainer["tokens_per_s"], 3)
    # The warm figures are what they say: every adapter was resident before they were timed.
    assert serving["warm_runs_loads_from_disk"] == 0
    # The engine on the static cache captured nothing on the CPU (no graphs), and failed nothing.
    engine_static = serving["static_engine"]
    assert engine_static["graph_captures"] == 0 and engine_static["graph_error"] is None
    # The bench-only Triton kernel (interpreted here) took the decode steps and declined the
    # prefills, which have more rows: the comparison timed the kernel, not the fallback.
    answers = serving["lora_kernel"]["kernel_answers"]
    assert answers["taken"] > 0 and answers["declined"] > 0
    # auto's shrink outside CUDA graphs is mm, and every shrink was timed on the adapter's steps.
    steps = engine_static["decode_steps"]
    assert (steps["step_mode"], steps["step_shrink"]) == ("eager", "mm")
    assert sorted(steps["step_batch1_adapter_by_shrink"]) == sorted(SHRINKS)
    # The share of the bandwidth bound at batch 1 is each base rate times the bytes a token reads
    # over the copy bandwidth the run measured.
    bandwidth = report["copy_bandwidth_gb_s"] * 1e9
    rates = {"hf_generate": serving["decode_base_tokens_per_s"],
             "server_static_slots": engine_static["engine_static_batch1_base_tokens_per_s"],
             "decode_step": steps["step_batch1_base_tokens_per_s"]}
    shares = serving["bandwidth_bound_share_batch1_base"]
    assert sorted(shares) == sorted(rates)
    for path, rate in rates.items():
        assert abs(shares[path] - rate * serving["weight_bytes_per_token"] / bandwidth) < 0.0015 + 0.01 * shares[path], path
    # The stages' times add up within the shape's (the GPU run has an 8-minute bound to keep).
    assert result["shape_s"] >= result["training_s"] + result["serving_s"] > 0
    assert "tiny" in done.stdout and "the issue's bound" in done.stdout  # the table, then the times
    # --profile: each window's operator table is in the text file.
    windows = ["training", "decode base, batch 1", "decode one adapter, batch 1", "decode base, batch 16",
               "decode 16 adapters, batch 16"]
    assert sorted(result["profile"]) == sorted(windows)
    tables = (tmp_path / "tiny-profile.txt").read_text()
    assert all(f"== tiny / {w}:" in tables for w in windows) and "aten::mm" in tables


def _errors(tree, path: str = ""):
    """The paths of every "error" key with a value, anywhere in a bench report."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("error", "graph_error") and value is not None:
                yield f"{path}.{key}: {str(value)[:200]}"
            else:
                yield from _errors(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _errors(value, f"{path}[{i}]")


def test_the_trainers_8bit_optimizer_registry_is_cleared_after_its_run():
    """The Trainer registers embeddings with bitsandbytes' process-wide manager for an 8-bit
    optimizer; left there, an 8B shape's 1.05 GB embedding outlived its base (H100, bench-gpu)."""
    import gc
    import weakref

    from bitsandbytes.optim import GlobalOptimManager

    from bench.training import forget_8bit_overrides

    embedding = torch.nn.Embedding(4, 2)
    GlobalOptimManager.get_instance().register_module_override(embedding, "weight", {"optim_bits": 32})
    weight = weakref.ref(embedding.weight)
    del embedding
    gc.collect()
    assert weight() is not None  # what the Trainer leaves behind
    forget_8bit_overrides()
    gc.collect()
    assert weight() is None


@pytest.mark.slow
def test_lora_products_bench_times_every_variant_and_each_computes_the_product(tmp_path):
    """bench/lora_products.py's CPU path (eager, small shapes, the compiled variants included)."""
    out = tmp_path / "products.json"
    done = subprocess.run([sys.executable, "-m", "bench.lora_products", "--out", str(out), "--compiled"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    cases = {case["kind"]: case for case in json.loads(out.read_text())["cases"]}
    expected = {"shrink": {"mm_At", "mm_A_x", "mv", "mul_sum", "reduce"},
                "expand": {"addmm_", "addmv_", "mul_sum_add_compiled"}}
    assert {kind: set(case["variants"]) for kind, case in cases.items()} == expected
    for kind, case in cases.items():
        for name, figures in case["variants"].items():
            assert figures["us_per_call"] > 0 and figures["max_rel_error"] < 1e-4, (kind, name)
        current = {"shrink": "mm_At", "expand": "addmm_"}[kind]
        assert case["variants"][current]["vs_current"] == 1.0
