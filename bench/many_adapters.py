"""`make bench-many`: 100 registered adapters on one base, served by one engine (CPU or GPU).

Three figures, written to bench/results/many-adapters-<device>.json and printed:

- **distinct adapters per batch**: 64 concurrent requests spread over 1, 4, 16 or 64 adapters
  (every one resident), generated tokens/s against the same 64 requests on the base alone, every
  reply exactly --max-new-tokens long (`ignore_eos`). This
  is what S-LoRA's "thousands of adapters" figure measures: the cost of mixing, not of loading.
- **churn**: requests over all 100 adapters with a Zipf popularity (s = 1.1, a few hot adapters
  and a long tail) from 16 client threads, with room for only `--max-loaded` on the device: LRU
  hits and misses, loads from host memory and from disk, and time to first token on a hit
  against a miss (a miss pays the load, and stalls the batch's step while it happens); and, alone
  on an idle engine, the time to first token with the adapter read from disk, from host memory,
  and already resident.
- **memory per resident adapter**: the routed stacks' bytes per adapter against the analytic
  size, r·(in + out) per adapted layer in the stacks' dtype (the stacks pad every adapter to the
  largest resident rank, and are the only copy: peft's A and B are views into them).

The adapters are the demo adapters' own weights, each copied with its own multiplicative noise
(so every adapter is distinct and answers like a real one), rank and targets unchanged.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters import AdapterStore, BaseConfig, BaseShape, Message, load_base
from adapters.base import DEFAULT_BASE
from adapters.store import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHAT_TEMPLATE_FILE
from bench.machine import describe
from bench.serve import PROMPTS
from serve.engine import ChatRequest, Engine, SamplingParams
from serve.registry import AdapterRegistry

DISTINCT = (1, 4, 16, 64)
"""How many distinct adapters the batch's requests spread over (the issue's figures)."""
ZIPF_S = 1.1


def build_store(source: AdapterStore, root: Path, count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` adapters in a new store under `root`: (name, the demo task whose prompt it answers)."""
    tasks = [t for t in PROMPTS if source.exists(t)]
    if not tasks:
        raise SystemExit(f"no demo adapter in {source.root}: run make demo-adapters")
    store = AdapterStore(root)
    made = []
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        task = tasks[i % len(tasks)]
        folder = source.path(task).resolve()
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
        noisy = {k: v * (1 + 0.05 * torch.randn(v.shape, generator=generator)) for k, v in weights.items()}
        name = f"{task}-{i:03d}"
        with store.write(name) as out:
            (out / ADAPTER_CONFIG).write_text((folder / ADAPTER_CONFIG).read_text())
            save_file(noisy, str(out / ADAPTER_WEIGHTS))
            if (folder / CHAT_TEMPLATE_FILE).is_file():
                (out / CHAT_TEMPLATE_FILE).write_text((folder / CHAT_TEMPLATE_FILE).read_text())
        made.append((name, task))
    return made


def new_engine(base_path: str, root: Path, max_loaded: int, max_batch: int) -> Engine:
    from serve.engine import ServeLimits

    base = load_base(BaseConfig(base_path))
    registry = AdapterRegistry(AdapterStore(root), BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    return Engine(base, registry, max_loaded=max_loaded, limits=ServeLimits(max_batch=max_batch))


def ask(name: str, task: str, max_new: int) -> ChatRequest:
    """A request that generates exactly `max_new` tokens (`ignore_eos`): a one-word answer (a
    sentiment label) and the base's rambling then cost the same steps, and tokens/s compares
    like with like."""
    return ChatRequest(name, (Message("user", PROMPTS[task]),), SamplingParams(max_new_tokens=max_new, ignore_eos=True))


def throughput(engine: Engine, requests: list[ChatRequest]) -> float:
    """Generated tokens/s of the requests sent at once."""
    loop = engine.loop()
    loop.wait_ready()
    start = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(loop.generate, requests))
    elapsed = time.perf_counter() - start
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(failed[0])
    return sum(r.new_tokens for r in results) / elapsed


def distinct_figures(engine: Engine, adapters: list[tuple[str, str]], batch: int, max_new: int, rounds: int) -> dict:
    out = {}
    for k in [k for k in DISTINCT if k <= min(len(adapters), batch)]:
        picks = [adapters[i % k] for i in range(batch)]
        requests = [ask(name, task, max_new) for name, task in picks]
        base_requests = [ask("base", task, max_new) for _, task in picks]  # the same prompts, on the base
        throughput(engine, requests)  # every adapter of this round resident, threads chosen
        pairs = [(throughput(engine, requests), throughput(engine, base_requests)) for _ in range(rounds)]
        ratio = statistics.median(ours / base for ours, base in pairs)
        out[str(k)] = {"tokens_per_s": round(statistics.median(p[0] for p in pairs), 1),
                       "base_tokens_per_s": round(statistics.median(p[1] for p in pairs), 1), "vs_base": round(ratio, 3)}
        print(f"  {k:3d} distinct adapters in a batch of {batch}: {out[str(k)]}")
    return out


def zipf_choices(count: int, n: int, rng: random.Random) -> list[int]:
    weights = [1 / (i + 1) ** ZIPF_S for i in range(count)]
    return rng.choices(range(count), weights=weights, k=n)


def churn_figures(engine: Engine, adapters: list[tuple[str, str]], n: int, clients: int, max_new: int) -> dict:
    rng = random.Random(0)
    order = list(range(len(adapters)))
    rng.shuffle(order)  # popularity independent of the adapters' order of registration
    picks = [adapters[order[i]] for i in zipf_choices(len(adapters), n, rng)]
    before = engine.residency.snapshot()
    loop = engine.loop()

    def one(pick: tuple[str, str]) -> tuple[bool, float]:
        key = engine.registry.resolve(pick[0]).key
        resident = key in engine.resident()
        stream = loop.submit(ask(*pick, max_new))
        result = stream.wait(600)
        if result.error:
            raise RuntimeError(result.error)
        return resident, stream.token_times[0] - stream.queued_at

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        seen = list(pool.map(one, picks))
    elapsed = time.perf_counter() - start
    after = engine.residency.snapshot()
    loads = {source: sum(v for (_, s), v in after.loads.items() if s == source) -
             sum(v for (_, s), v in before.loads.items() if s == source) for source in ("host", "disk")}
    hits = [t for resident, t in seen if resident]
    misses = [t for resident, t in seen if not resident]
    return {"requests": n, "clients": clients, "adapters": len(adapters), "max_loaded": engine.cache.capacity,
            "elapsed_s": round(elapsed, 2), "hits_at_submit": len(hits), "misses_at_submit": len(misses),
            "loads_from_host": loads["host"], "loads_from_disk": loads["disk"],
            "ttft_hit_median_s": round(statistics.median(hits), 4) if hits else None,
            "ttft_miss_median_s": round(statistics.median(misses), 4) if misses else None}


def first_token_s(engine: Engine, pick: tuple[str, str], max_new: int) -> float:
    stream = engine.loop().submit(ask(*pick, max_new))
    result = stream.wait(600)
    if result.error:
        raise RuntimeError(result.error)
    return stream.token_times[0] - stream.queued_at


def load_probe(engine: Engine, adapters: list[tuple[str, str]], probes: int, max_new: int) -> dict:
    """Time to first token of one request alone on an idle engine, its adapter read from disk, from
    host memory (evicted just before), and already resident: what a miss costs without queueing."""
    times: dict[str, list[float]] = {"disk": [], "host": [], "resident": []}
    first_token_s(engine, adapters[0], max_new)  # the loop started and its threads chosen
    for pick in adapters[-probes:]:  # never loaded before in this engine
        times["disk"].append(first_token_s(engine, pick, max_new))
        times["resident"].append(first_token_s(engine, pick, max_new))
        engine.evict(pick[0])
        times["host"].append(first_token_s(engine, pick, max_new))
    return {f"ttft_{where}_median_s": round(statistics.median(t), 4) for where, t in times.items()}


def memory_figures(engine: Engine) -> dict:
    router = engine.router
    stacks = router.stacks
    n = len(stacks.keys)
    stacked = sum(s.A.numel() * s.A.element_size() + s.Bt.numel() * s.Bt.element_size() for _, s in stacks.layers
                  if s.group is None)
    stacked += sum(g.A.numel() * g.A.element_size() for g in stacks.input_groups)
    stacked += sum(s.Bt.numel() * s.Bt.element_size() for _, s in stacks.layers if s.group is not None)
    itemsize = torch.empty((), dtype=stacks.dtype).element_size()
    analytic = sum(r * (layer.get_base_layer().in_features + layer.get_base_layer().out_features) * itemsize
                   for layer, s in stacks.layers for r in s.ranks) / n
    return {"resident": n, "padded_rank": stacks.rank, "dtype": str(stacks.dtype).removeprefix("torch."),
            "stack_bytes_per_adapter": round(stacked / n), "analytic_bytes_per_adapter": round(analytic),
            "stack_vs_analytic": round(stacked / n / analytic, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--adapters", default=None, help="the store holding the demo adapters to copy")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--churn-requests", type=int, default=200)
    parser.add_argument("--churn-max-loaded", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results: dict = {"machine": describe(), "base": args.base, "adapters": args.count, "batch": args.batch,
                     "max_new_tokens": args.max_new_tokens}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "store"
        adapters = build_store(AdapterStore(args.adapters), root, args.count)
        engine = new_engine(args.base, root, max_loaded=max(DISTINCT), max_batch=args.batch)
        try:
            print(f"distinct adapters per batch ({results['machine']}):")
            results["distinct"] = distinct_figures(engine, adapters, args.batch, args.max_new_tokens, args.rounds)
            results["memory"] = memory_figures(engine)
            print(f"memory per resident adapter: {results['memory']}")
        finally:
            engine.close()
        engine = new_engine(args.base, root, max_loaded=args.churn_max_loaded, max_batch=args.batch)
        try:
            alone = load_probe(engine, adapters, 5, args.max_new_tokens)  # first: every probe's adapter unread
            results["churn"] = churn_figures(engine, adapters, args.churn_requests, 16, args.max_new_tokens)
            results["churn"]["alone"] = alone
            print(f"churn: {results['churn']}")
        finally:
            engine.close()
    device = "gpu-" + torch.cuda.get_device_name().lower().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    out = Path(args.out or f"bench/results/many-adapters-{device}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
