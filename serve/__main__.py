"""`python -m serve list`, `python -m serve chat --adapter NAME "message"` and `python -m serve vllm`."""

from __future__ import annotations

import argparse
import logging
import sys

from adapters import AdapterStore, BaseConfig, BaseShape, Message, load_base
from adapters.base import resolve_device
from serve.engine import ChatRequest, Engine, SamplingParams
from serve.registry import AdapterRegistry
from serve.routing import KERNELS, LoraRouter


def build_registry(args) -> tuple[AdapterRegistry, object]:
    base = load_base(BaseConfig(args.base, quantize=not args.no_quant))
    registry = AdapterRegistry(AdapterStore(args.adapters), BaseShape.of(base.model, base.fingerprint))
    registry.refresh()
    return registry, base


def cmd_list(args) -> int:
    registry, _ = build_registry(args)
    print(f"{'name':<20} {'task':<12} {'rank':>4}  {'exact match (base -> adapter)'}")
    for entry in registry.servable():
        card = entry.card
        metric = f"{card.metric.base:.3f} -> {card.metric.adapter:.3f}" if card and card.metric else "-"
        print(f"{entry.name:<20} {(card.task if card else '-'):<12} {entry.rank:>4}  {metric}")
    for rejection in registry.rejected():
        print(f"{rejection.name:<20} REJECTED: {rejection.reason}")
    return 0


def cmd_chat(args) -> int:
    registry, base = build_registry(args)
    engine = Engine(base, registry)
    messages = ((Message("system", args.system),) if args.system else ()) + (Message("user", args.message),)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    (result,) = engine.generate([ChatRequest(args.adapter, messages, params)])
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 2
    print(result.text)
    return 0


def cmd_vllm(args) -> int:
    """The vLLM launch command; the base's shape comes from its config, no weights are loaded."""
    import os

    from adapters.compat import base_shape_from_config
    from serve.vllm import vllm_plan

    registry = AdapterRegistry(AdapterStore(args.adapters), base_shape_from_config(args.base))
    registry.refresh()
    plan = vllm_plan(args.base, registry.store, registry.servable(), args.host, args.port, quantized=not args.no_quant)
    for name, why in {**plan.excluded, **{r.name: r.reason for r in registry.rejected()}}.items():
        print(f"# left out {name}: {why}", file=sys.stderr)
    print(plan.shell())
    if args.run:
        os.execvp(plan.command[0], plan.command)
    return 0


def cmd_web(args) -> int:
    from serve.engine import ServeLimits
    from serve.server import access_from, run
    from serve.service import Service, ServiceConfig
    from serve.slots import DecodeSettings

    access = access_from(args)  # bad --auth entries fail before the base loads
    try:  # so does a kernel this machine cannot run, on the device the base will load to
        LoraRouter.check_kernel(args.lora_kernel, resolve_device(BaseConfig(args.base).device))
    except ValueError as err:
        print(f"error: --lora-kernel: {err}", file=sys.stderr)
        return 2
    config = ServiceConfig(base=args.base, adapters=args.adapters, quantize=not args.no_quant, max_loaded=args.max_loaded,
                           max_queue=args.max_queue, limits=ServeLimits(max_new_tokens=args.max_new_tokens_limit),
                           reports=args.reports, decode=DecodeSettings(static_cache=args.cuda_graphs, context=args.graph_context),
                           lora_kernel=args.lora_kernel)
    service = Service.start(config)
    try:
        run(service, access)
    finally:
        service.close()
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from serve.evaluate import evaluate_all, task_sets, write_report

    registry, base = build_registry(args)
    engine = Engine(base, registry, max_loaded=max(1, len(registry.servable())))
    sets = task_sets(Path(args.data_dir), args.limit)
    if not sets:
        print(f"error: no <task>/eval.jsonl under {args.data_dir}", file=sys.stderr)
        return 2
    matrix = evaluate_all(engine, sets)
    path = write_report(matrix, Path(args.reports), args.base)
    print(path.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve", description="Serve QLoRA adapters on one 4-bit base.")
    parser.add_argument("--base", default="models/demo-base", help="Base model folder or hub id.")
    parser.add_argument("--adapters", default=None, help="Adapter store (default: $ADAPTERS_DIR or adapters/store).")
    parser.add_argument("--no-quant", action="store_true", help="Load the base unquantized.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="Servable adapters, and rejected ones with their reasons.")
    chat = sub.add_parser("chat", help="One reply from one adapter ('base' for none).")
    chat.add_argument("message")
    chat.add_argument("--adapter", default="base")
    chat.add_argument("--system", default=None)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--seed", type=int, default=None)
    vllm = sub.add_parser("vllm", help="Print the vLLM multi-LoRA launch command for every servable adapter.")
    vllm.add_argument("--host", default="127.0.0.1")
    vllm.add_argument("--port", type=int, default=8000)
    vllm.add_argument("--run", action="store_true", help="Run it (vLLM must be installed) instead of printing it.")
    web = sub.add_parser("web", help="The web UI and the OpenAI-compatible API on one server.")
    web.add_argument("--host", default="127.0.0.1", help="Address to bind (loopback by default).")
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--auth", default=None, help="UI login user:password (comma-separated for several).")
    web.add_argument("--auth-file", default=None, help="File with user:password lines ($LORASWAP_AUTH also works).")
    web.add_argument("--api-key", default=None, help="Bearer token the API requires ($LORASWAP_API_KEY also works).")
    web.add_argument("--max-queue", type=int, default=32, help="Requests waiting or running at once; more get 'busy'.")
    web.add_argument("--max-loaded", type=int, default=8, help="Adapters resident on the device at once.")
    web.add_argument("--max-new-tokens-limit", type=int, default=256, help="Server-side cap on max new tokens.")
    web.add_argument("--reports", default="reports", help="Where `make eval` wrote the matrix the Adapters tab shows.")
    web.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                     help="Decode from static row slots, each step captured once as a CUDA graph and replayed "
                          "(the CPU runs the same steps eagerly). Default: on when the base loads to a GPU with "
                          "SDPA attention; --no-cuda-graphs keeps the growing KV cache. See README, Performance.")
    web.add_argument("--graph-context", type=int, default=1024,
                     help="With the static slots: tokens of prompt and reply one request may hold (replies are "
                          "capped to fit; a longer prompt is refused, naming this limit).")
    web.add_argument("--lora-kernel", choices=KERNELS, default="auto",
                     help="What adds each row's LoRA delta: auto (a fused C++ kernel for float32 on the CPU, torch "
                          "ops elsewhere), torch, or triton (one Triton kernel per layer for decode steps of up to 4 "
                          "rows; needs the triton package; experimental, see README, Performance).")
    evaluate = sub.add_parser("eval", help="Every servable adapter and the base on every task's eval set.")
    evaluate.add_argument("--data-dir", default="data", help="Folder of <task>/eval.jsonl files.")
    evaluate.add_argument("--limit", type=int, default=200, help="Examples per task.")
    evaluate.add_argument("--reports", default="reports")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return {"list": cmd_list, "chat": cmd_chat, "vllm": cmd_vllm, "web": cmd_web, "eval": cmd_eval}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
