"""Several training processes: two CPU processes over gloo train what one process trains with
twice the accumulation, and only one of them publishes the adapter. FSDP is refused on the CPU.

The launch is the documented one (docs/training.md#several-processes):
`accelerate launch --config_file configs/accelerate/cpu-ddp.yaml -m train ...`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from peft import PeftModel
from transformers import AutoModelForCausalLM

import train.loop as loop
from adapters.card import read_card
from adapters.store import AdapterStore
from tests.conftest import ANIMAL_COLORS, chat, free_port, write_jsonl
from train.__main__ import main as train_cli
from train.config import config_from_args

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
CPU_DDP = ACCELERATE_CONFIGS / "cpu-ddp.yaml"
PROCESSES = 2
LAUNCH_TIMEOUT_S = 240
"""The launch takes about 15 s here (two processes importing torch and loading the base, then 8
steps); the bound is for a hang (a process waiting on a collective that never comes)."""

LOSS_TOLERANCE = 2e-5
"""Per-step (and eval) losses of the two-process run against the one-process run, as the card
records them (rounded to 5 decimals). Where the number comes from: with both sides on one thread
per process, every micro-batch's forward and backward are the same float32 operations on the
same NF4 bytes (bitsandbytes dequantizes them identically in every process), and the gradients
are bit-identical: DDP's loss is scaled by 2 and its average halves it, both exact in binary
floating point, and adding the two processes' halves is the one addition one process makes.
What can differ is the recorded loss itself: l0/T + l1/T summed over processes against
(l0 + l1)/T in one, a float32 rounding or two (under 1e-6 at losses near 10), which rounding to
5 decimals can turn into one unit of 1e-5. Measured: 0.0 on all 10 recorded losses (and the saved
LoRA weights bit-identical); with the one-process run on 2 threads instead of 1 the losses were
still equal to 5 decimals and the weights within 7.1e-5 (0.07% of their largest value), from
the matmuls' other summation order. The margin: twice the rounding unit."""


def fake_accelerator(rank: int, processes: int) -> SimpleNamespace:
    """What epoch_windows and local_share read of an Accelerator."""
    return SimpleNamespace(process_index=rank, num_processes=processes)


def windows(lengths: list[int], accum: int, processes: int, rank: int = 0) -> list:
    config = config_from_args(["--name", "x", "--data", "unused.jsonl", "--micro-batch-size", "4", "--grad-accum", str(accum)])
    return loop.epoch_windows(lengths, config, epoch=0, accelerator=fake_accelerator(rank, processes))


def test_processes_share_the_steps_of_one_process_with_their_accumulation():
    lengths = [5 + (i * 7) % 13 for i in range(29)]  # 8 micro-batches of 4 (the last of 1)
    for accum in (1, 2):
        steps = windows(lengths, accum, PROCESSES)
        assert steps == windows(lengths, accum * PROCESSES, 1)  # the same micro-batches in the same steps
        assert all(windows(lengths, accum, PROCESSES, rank) == steps for rank in range(PROCESSES))
        for step in steps:
            shares = [loop.local_share(step, fake_accelerator(r, PROCESSES)) for r in range(PROCESSES)]
            real = [b for share, weight in shares if weight for b in share]
            assert sorted(real) == sorted(step) and len(real) == len(step)  # each micro-batch once
            assert all(share for share, _ in shares)  # every process runs something: none waits alone


def test_a_process_without_a_micro_batch_runs_one_that_counts_nothing():
    step = [[0, 1, 2, 3]]  # a last step with one micro-batch for two processes
    assert loop.local_share(step, fake_accelerator(0, 2)) == (step, 1)
    assert loop.local_share(step, fake_accelerator(1, 2)) == (step, 0)


@pytest.mark.parametrize("path", sorted(ACCELERATE_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_loads(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.mixed_precision == "no"
    if path == CPU_DDP:
        # MULTI_GPU is the launcher that starts num_processes processes (torchrun); the loop's
        # Accelerator(cpu=True) makes them MULTI_CPU over gloo.
        assert config.distributed_type == "MULTI_GPU" and config.use_cpu and config.main_process_ip == "127.0.0.1"


def test_an_fsdp_launch_for_a_cpu_base_is_refused_before_accelerate_starts(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(loop.ConfigError, match="FSDP.*CPU.*cpu-ddp.yaml"):
        loop.make_accelerator(torch.device("cpu"))


# -- the two-process run against the one-process run -------------------------------------


def run_args(base: Path, data: Path, root: Path, *extra: str) -> list[str]:
    return ["--name", "toy", "--base", str(base), "--data", str(data), "--eval-data", str(data.parent / "eval.jsonl"),
            "--r", "8", "--alpha", "16", "--lr", "5e-3", "--epochs", "2", "--micro-batch-size", "4",
            "--dropout", "0",  # dropout masks come from each process's own RNG stream: not comparable
            "--log-every", "1", "--runs-dir", str(root / "runs"), "--adapters", str(root / "store"), *extra]


def launch_cpu_ddp(args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/cpu-ddp.yaml -m train ARGS` on loopback, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
               "--num_processes", str(PROCESSES), "--main_process_port", str(free_port()), "-m", "train", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def train_alone_on_one_thread(args: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): the same summation order
    try:
        assert train_cli(args) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def odd_task(tmp_path) -> Path:
    """25 examples: 7 micro-batches of 4 per epoch, so each epoch's last step holds one micro-batch
    for two processes (one of them runs a weightless one)."""
    rows = [chat(f"Color of {animal}?", color) for animal, color in ANIMAL_COLORS.items()]
    write_jsonl(tmp_path / "toy" / "eval.jsonl", rows)
    return write_jsonl(tmp_path / "toy" / "train.jsonl", rows * 4 + rows[:1])


@pytest.mark.slow
def test_two_cpu_processes_train_what_one_trains_with_their_accumulation_and_publish_once(tiny_base, odd_task, tmp_path):
    ddp, alone = tmp_path / "ddp", tmp_path / "alone"
    done = launch_cpu_ddp(run_args(tiny_base, odd_task, ddp, "--checkpoint-every", "4"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    # One process alone would take 14 steps of 4 examples (7 an epoch) and processes that had not
    # joined would each publish: the step count and the single version below rule both out.
    assert done.stdout.count("saved ") == 1  # one process reports the adapter it published
    train_alone_on_one_thread(run_args(tiny_base, odd_task, alone, "--grad-accum", str(PROCESSES)))

    store = AdapterStore(ddp / "store")
    assert len(store.versions("toy")) == 1  # published once
    assert {p.name for p in store.root.iterdir()} <= {"toy", ".versions", ".staging"}
    assert not any((store.root / ".staging").glob("*"))  # no partial folder left
    checkpoints = ddp / "runs" / "toy" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004", "step-00000008"]  # no .tmp-step-*

    card, reference = read_card(store.path("toy")), read_card(AdapterStore(alone / "store").path("toy"))
    assert card.training.batch_size == reference.training.batch_size == 8  # 4 x 1 x 2 processes, 4 x 2 alone
    assert card.training.steps == reference.training.steps == 8
    history, expected = card.training.history, reference.training.history
    assert [sorted(h) for h in history] == [sorted(h) for h in expected]  # the same steps and evals recorded
    assert len([h for h in history if "train_loss" in h]) == 8
    for got, want in zip(history, expected):
        for key in ("train_loss", "eval_loss"):
            if key in want:
                assert abs(got[key] - want[key]) <= LOSS_TOLERANCE, (got, want)
    assert card.training.eval_loss < history[0]["train_loss"]  # it trained

    # A valid PEFT adapter: plain peft loads it on a freshly loaded base, and it is no no-op.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(store.path("toy")))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(bool(p.abs().sum() > 0) for p in lora_b)


# -- FSDP: what torch does on the CPU, where accelerate sets up none ----------------------


@pytest.mark.slow
def test_torch_fsdp_shards_the_qlora_model_on_the_cpu_with_peft_wrapping_only(tiny_base, odd_task):
    """The evidence behind docs/training.md#fsdp-on-the-cpu and `loop.use_peft_fsdp_wrapping`.

    Sharded and unsharded runs take the same float32 steps on the same batch; their losses are
    compared to 1e-6, float32 rounding at losses near 10 (measured: equal in every printed digit).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(ACCELERATE_USE_FSDP="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "tests.fsdp_cpu_probe", str(tiny_base), str(odd_task)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "uniform `requires_grad`" in found["refusal"]  # fsdp-qlora.yaml's block wrapping alone
    assert found["storage"] == "torch.float32"  # the 4-bit bytes in compute-dtype containers, as FSDP needs
    (before, after), (sharded_before, sharded_after) = found["unsharded"], found["sharded"]
    assert after < before - 0.5  # the step trained (B moved off zero)
    assert sharded_before == pytest.approx(before, abs=1e-6) and sharded_after == pytest.approx(after, abs=1e-6)
