"""Fixtures: a tiny Llama base (random weights, the demo tokenizer trained small) built in seconds.

torch, transformers, peft and the project are imported inside the functions that use them, not
here: under `pytest -n` (make test-fast) the controlling process loads this file but runs no
test, and importing them there would add their import time to every run."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from typing import TYPE_CHECKING

import pytest
from filelock import FileLock

if TYPE_CHECKING:
    from adapters import AdapterStore
    from serve.engine import ChatRequest, Engine
    from serve.slots import DecodeSettings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def build_tiny_base(folder: Path, seed: int = 0, hidden: int = 64) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from demo.base import train_tokenizer

    tokenizer = train_tokenizer(folder, vocab_size=384, seed=0, corpus_examples=1500)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
        # A wide init gives the random output head logits large enough for a LoRA to move
        # (at 0.02 no reply can reach a confident logit and nothing is learnable).
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """A second base with other shapes, for adapters that must be refused."""
    return build_tiny_base(tmp_path_factory.mktemp("other-base"), seed=1, hidden=128)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(user: str, reply: str, system: str | None = None) -> dict:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


@pytest.fixture
def toy_task(tmp_path) -> Path:
    """A task a tiny random model can learn in a few dozen steps: name a fixed color per animal."""
    colors = {"cat": "red", "dog": "blue", "bird": "green", "fish": "red", "king": "blue", "queen": "green"}
    rows = [chat(f"Color of {animal}?", color) for animal, color in colors.items()] * 20
    write_jsonl(tmp_path / "toy" / "eval.jsonl", [chat(f"Color of {a}?", c) for a, c in colors.items()])
    return write_jsonl(tmp_path / "toy" / "train.jsonl", rows)


# -- serving: a store of random adapters on the tiny base ---------------------------------

PROMPTS = ["Color of cat?", "Say this back: red hill", "What is 3 + 4?", "Echo: the big dog"]


def random_adapter(base_path: Path, seed: int):
    """A LoRA with random A and B (init_lora_weights=False): its outputs differ from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def save_random_adapter(store: AdapterStore, name: str, base_path: Path, seed: int, model=None) -> None:
    model = model or random_adapter(base_path, seed)
    with store.write(name) as folder:
        model.save_pretrained(folder)


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    from adapters import AdapterStore, BaseConfig, BaseShape, load_base
    from serve.registry import AdapterRegistry

    store = AdapterStore(tmp_path_factory.mktemp("store"))
    for i, name in enumerate(["a", "b", "c", "d"]):
        save_random_adapter(store, name, tiny_base, seed=i + 10)
    base = load_base(BaseConfig(str(tiny_base)))
    registry = AdapterRegistry(store, BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    return store, base, registry


def new_engine(tiny_base, registry, max_loaded: int = 4, decode: DecodeSettings | None = None) -> Engine:
    """An engine on its own copy of the base: peft injects adapters into the model it wraps.
    Deterministic unless asked otherwise: tests compare its answers across batches."""
    from adapters import BaseConfig, load_base
    from serve.engine import Engine
    from serve.slots import DecodeSettings

    decode = decode or DecodeSettings(deterministic=True)
    return Engine(load_base(BaseConfig(str(tiny_base))), registry, max_loaded=max_loaded, decode=decode)


def request(adapter: str, prompt: str = PROMPTS[0], **params) -> ChatRequest:
    from adapters import Message
    from serve.engine import ChatRequest, SamplingParams

    return ChatRequest(adapter, (Message("user", prompt),), SamplingParams(**{"max_new_tokens": 6, **params}))


def texts(engine: Engine, requests) -> list[str]:
    results = engine.generate(requests)
    assert all(r.error is None for r in results), results
    return [r.text for r in results]


# -- a live server: the tiny base with two trained adapters --------------------------------

ANIMAL_COLORS = {"cat": "red", "dog": "blue", "bird": "green", "fish": "red", "king": "blue", "queen": "green"}
ANIMAL_SIZES = {"cat": "small", "dog": "big", "bird": "tiny", "fish": "small", "king": "big", "queen": "tiny"}


def train_two_adapters(base: Path, root: Path) -> AdapterStore:
    """'colors' and 'sizes': two adapters trained on the tiny base, each answering its own task."""
    from adapters import AdapterStore
    from train.__main__ import main as train_cli

    store = AdapterStore(root / "store")
    for name, table, question in (("colors", ANIMAL_COLORS, "Color of {}?"), ("sizes", ANIMAL_SIZES, "Size of {}?")):
        rows = [chat(question.format(a), v) for a, v in table.items()]
        data = write_jsonl(root / name / "train.jsonl", rows * 20)
        write_jsonl(root / name / "eval.jsonl", rows)
        args = ["--name", name, "--base", str(base), "--data", str(data), "--eval-data", str(root / name / "eval.jsonl"),
                "--r", "8", "--alpha", "16", "--lr", "5e-3", "--epochs", "10", "--micro-batch-size", "8",
                "--runs-dir", str(root / "runs"), "--adapters", str(store.root)]
        assert train_cli(args) == 0
    return store


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a thread on a free loopback port; `url` once it accepts connections.
    app_options: `make_app`'s keywords (limits, fleet)."""

    def __init__(self, service, access, **app_options):
        import threading

        import uvicorn

        from serve.server import make_app

        self.service, self.access = service, access
        self.url = f"http://{access.host}:{access.port}"
        config = uvicorn.Config(make_app(service, access, **app_options), host=access.host, port=access.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start in 30 s"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.service.close()


def wait_until(condition, timeout: float) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def start_service(base: Path, store: AdapterStore, max_queue: int = 32, reports: Path | None = None,
                  decode: DecodeSettings | None = None):
    from serve.service import Service, ServiceConfig
    from serve.slots import DecodeSettings

    decode = decode or DecodeSettings()
    reports = reports or store.root.parent / "reports"  # never the repository's own reports/
    return Service.start(ServiceConfig(base=str(base), adapters=str(store.root), max_queue=max_queue, watch_s=0.2,
                                       reports=str(reports), decode=decode))


@pytest.fixture(scope="session")
def two_adapters(tiny_base, tmp_path_factory, pytestconfig) -> AdapterStore:
    """Trained once per machine and code: the store is a pure function of the code that builds
    the tiny base and trains (their sources are in the key), the library versions and the CPU,
    so a later session copies it rather than spending half a minute retraining it."""
    from adapters import AdapterStore

    scratch = tmp_path_factory.mktemp("two-adapters-built")
    built = build_once(pytestconfig, "two-adapters", TRAINING_SOURCES, lambda folder: train_two_adapters(tiny_base, folder),
                       scratch / "built")
    if built == scratch / "built":
        return AdapterStore(built / "store")
    root = tmp_path_factory.mktemp("two-adapters")  # a copy: tests add to and replace in the store
    shutil.copytree(built, root, dirs_exist_ok=True, symlinks=True)  # the store (its name -> version links kept) and each task's data
    return AdapterStore(root / "store")


TRAINING_SOURCES = ("adapters", "train", "demo", "tests/conftest.py")
"""What the trained fixtures depend on beyond the libraries: the tiny base's builder and tokenizer
trainer (demo/), the trainer and the contract it saves by."""


def fixture_cache(pytestconfig, name: str, sources: tuple[str, ...]) -> Path | None:
    """A folder under pytest's cache for a fixture built from `sources`, keyed by their contents,
    the libraries' versions and the CPU's flags; None with LORASWAP_FIXTURE_CACHE=0 (CI's fresh
    clone starts with an empty cache either way)."""
    if os.environ.get("LORASWAP_FIXTURE_CACHE", "1") == "0":
        return None
    digest = hashlib.sha256()
    for file in sorted(f for s in sources for f in ([REPO / s] if (REPO / s).is_file() else (REPO / s).rglob("*.py"))):
        digest.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes())
    for package in ("torch", "transformers", "peft", "bitsandbytes", "tokenizers"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    digest.update(cpu_flags().encode())
    return Path(pytestconfig.cache.mkdir(f"loraswap-{name}-{digest.hexdigest()[:16]}"))


def build_once(pytestconfig, name: str, sources: tuple[str, ...], build: Callable[[Path], object],
               scratch: Path) -> Path:
    """The folder `build(folder)` fills, built once per machine and code (fixture_cache), or into
    `scratch` when the cache is off. The workers of one `pytest -n` run share the cache: a lock lets
    one build while the others wait, and the rename means a run killed mid-build leaves no half folder."""
    cache = fixture_cache(pytestconfig, name, sources)
    if cache is None:
        build(scratch)
        return scratch
    done, partial = cache / "built", cache / "built.partial"
    with FileLock(cache / "lock"):
        if not done.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
            build(partial)
            partial.rename(done)
    return done


def cpu_flags() -> str:
    """The CPU's feature flags: kernels round differently on CPUs with and without AVX512-BF16/AMX."""
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def run_triton_checks(request, tmp_path: Path, checks: str) -> None:
    """Run tests/<checks> in a pytest process of its own: interpreted (TRITON_INTERPRET=1) without a
    GPU, with this run's marker selection; fail unless every check ran and passed.

    Triton fixes at its first import whether it compiles or interprets, and this process imported
    it already (peft does), so only a fresh process can interpret."""
    import subprocess
    import sys

    import torch

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    markers = request.config.getoption("markexpr")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "checks"),
               *(["-m", markers] if markers else []), str(root / "tests" / checks)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    last = done.stdout.splitlines()[-1]
    assert " passed" in last and "skipped" not in last and "deselected" not in last, done.stdout[-2000:]
