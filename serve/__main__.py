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
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    registry, base = build_registry(args)
    engine = Engine(base, registry)  # the server's decode loop, with one request in it
    messages = ((Message("system", args.system),) if args.system else ()) + (Message("user", args.message),)
    try:
        (result,) = engine.generate([ChatRequest(args.adapter, messages, params)])
    finally:
        engine.close()
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


WEB_BOUNDS = (  # flag, its args attribute, the least and the largest value it may take
    ("--port", "port", 1, 65535),
    ("--max-queue", "max_queue", 1, None),
    ("--max-loaded", "max_loaded", 1, None),
    ("--max-new-tokens-limit", "max_new_tokens_limit", 1, None),
    ("--graph-context", "graph_context", 1, None),
    ("--max-body-bytes", "max_body_bytes", 1, None),
    ("--max-messages", "max_messages", 1, None),
    ("--max-stop", "max_stop", 1, None),
    ("--max-stop-chars", "max_stop_chars", 1, None),
)


def out_of_range(args) -> str | None:
    """The first numeric `web` flag outside its range, said in one line; None when all are in range."""
    for flag, name, least, most in WEB_BOUNDS:
        value = getattr(args, name)
        if value < least or (most is not None and value > most):
            bounds = f"between {least} and {most}" if most is not None else f"at least {least}"
            return f"{flag} must be {bounds}, got {value}"
    return None


class UsageError(Exception):
    """An operator's mistake, found before anything slow starts: one line, and exit status 2."""


def check_web_args(args):
    """The server's access settings, after every check a typo can fail that needs no model:
    numeric ranges, logins and keys, the LoRA kernel on the device the base will load to."""
    from serve.server import access_from

    problem = out_of_range(args)
    if problem:
        raise UsageError(problem)
    try:
        access = access_from(args)
    except ValueError as err:
        raise UsageError(str(err)) from err
    try:
        LoraRouter.check_kernel(args.lora_kernel, resolve_device(BaseConfig(args.base).device))
    except ValueError as err:
        raise UsageError(f"--lora-kernel: {err}") from err
    return access


def listen(access):
    """The server's socket, bound now: a port in use fails here, before the base loads."""
    from serve.server import bind

    try:
        return bind(access)
    except OSError as err:
        raise UsageError(f"cannot serve on {access.host}:{access.port}: {err.strerror or err}") from err


def web_service_config(args):
    from serve.engine import ServeLimits
    from serve.service import ServiceConfig
    from serve.slots import DecodeSettings

    return ServiceConfig(base=args.base, adapters=args.adapters, quantize=not args.no_quant, max_loaded=args.max_loaded,
                         max_queue=args.max_queue, limits=ServeLimits(max_new_tokens=args.max_new_tokens_limit),
                         reports=args.reports, decode=DecodeSettings(static_cache=args.cuda_graphs, context=args.graph_context,
                                                                     deterministic=args.deterministic),
                         lora_kernel=args.lora_kernel)


def cmd_web(args) -> int:
    from serve.api import ApiLimits
    from serve.server import run
    from serve.service import Service

    try:
        access = check_web_args(args)
        sock = listen(access)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    limits = ApiLimits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages, max_stop=args.max_stop,
                       max_stop_chars=args.max_stop_chars)
    with sock:
        service = Service.start(web_service_config(args))
        try:
            run(service, access, sock, limits)
        finally:
            service.close()
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
    web.add_argument("--auth", action="append", default=None, metavar="USER:PASSWORD",
                     help="A UI login, split at the first colon (a comma is part of the password); repeat the "
                          "flag for several.")
    web.add_argument("--auth-file", default=None,
                     help="File of UI logins, one user:password per line ($LORASWAP_AUTH: the same, one per line).")
    web.add_argument("--api-key", default=None,
                     help="Bearer token the API requires; without --auth it is also the UI's login password. "
                          "Prefer $LORASWAP_API_KEY, which `ps` does not show.")
    web.add_argument("--max-queue", type=int, default=32, help="Requests waiting or running at once; more get 'busy'.")
    web.add_argument("--max-loaded", type=int, default=8, help="Adapters resident on the device at once.")
    web.add_argument("--max-new-tokens-limit", type=int, default=256, help="Server-side cap on max new tokens.")
    web.add_argument("--max-body-bytes", type=int, default=1 << 20, help="Largest API request body; larger is a 413.")
    web.add_argument("--max-messages", type=int, default=128, help="Most messages in one API request.")
    web.add_argument("--max-stop", type=int, default=16, help="Most stop strings in one API request.")
    web.add_argument("--max-stop-chars", type=int, default=256, help="Longest stop string in an API request.")
    web.add_argument("--reports", default="reports", help="Where `make eval` wrote the matrix the Adapters tab shows.")
    web.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                     help="Decode from static row slots, each step captured once as a CUDA graph and replayed "
                          "(the CPU runs the same steps eagerly). Default: on when the base loads to a GPU with "
                          "SDPA attention; --no-cuda-graphs keeps the growing KV cache. See docs/performance.md#device-dependent-defaults.")
    web.add_argument("--graph-context", type=int, default=1024,
                     help="With the static slots: tokens of prompt and reply one request may hold (replies are "
                          "capped to fit; a longer prompt is refused, naming this limit).")
    web.add_argument("--deterministic", action="store_true",
                     help="Every request's tokens (greedy, and seeded sampling) are the same whatever else the server "
                          "runs: prompts prefilled alone, full-width decode steps, per-row LoRA products, one thread "
                          "(docs/architecture.md#deterministic-mode; its cost: docs/performance.md#determinism).")
    web.add_argument("--lora-kernel", choices=KERNELS, default="auto",
                     help="What adds each row's LoRA delta: auto (a fused C++ kernel for float32 on the CPU, torch "
                          "ops elsewhere), torch, or triton (one Triton kernel per layer for decode steps of up to 4 "
                          "rows; needs the triton package; experimental, see README, Performance).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return {"list": cmd_list, "chat": cmd_chat, "vllm": cmd_vllm, "web": cmd_web}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
