"""`python -m serve list`, `python -m serve chat --adapter NAME "message"`, `python -m serve vllm` and
`python -m serve web` (the UI and the API on one server).

The flags that set a config field are generated from the dataclasses (serve/config.py): each is
named after the field it sets. `web --config FILE` loads a saved `ServeConfig` (configs/serve.yaml
holds the defaults), and the flags given override its keys.
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from adapters import AdapterStore, BaseConfig, BaseShape, Message, load_base
from adapters.cli import add_config_args, from_dict, given
from serve.config import ENGINE_FIELDS, SAMPLING_FIELDS, ServeConfig, serve_config
from serve.engine import ChatRequest, Engine, SamplingParams
from serve.registry import AdapterRegistry
from serve.server import DEFAULT_HOST
from serve.service import ServiceConfig

BASE_KEYS = ("service.base", "service.adapters", "service.quantize", "service.trust_remote_code")
"""The fields every command takes, given before its name (`python -m serve --base DIR list`)."""


def service_config(args) -> ServiceConfig:
    """The base and the store the flags before the command name chose (the rest: defaults)."""
    return serve_config(given(args, "service.")).service


def build_registry(args) -> tuple[AdapterRegistry, object]:
    config = service_config(args)
    base = load_base(BaseConfig(config.base, quantize=config.quantize, trust_remote_code=config.trust_remote_code))
    registry = AdapterRegistry(AdapterStore(config.adapters), BaseShape.of(base.model, base.fingerprint))
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


def sampling_params(args) -> SamplingParams:
    """`chat`'s sampling flags over SamplingParams' defaults; ValueError (RequestError) names a bad one."""
    return from_dict(SamplingParams, {k.removeprefix("sampling."): v for k, v in given(args, "sampling.").items()})


def cmd_chat(args) -> int:
    try:
        params = sampling_params(args)
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
    from serve.vllm import vllm_plan, write_handoff

    config = service_config(args)
    registry = AdapterRegistry(AdapterStore(config.adapters), base_shape_from_config(config.base))
    registry.refresh()
    plan = vllm_plan(config.base, registry.store, registry.servable(), args.host, args.port, quantized=config.quantize)
    for name, why in {**plan.excluded, **{r.name: r.reason for r in registry.rejected()}}.items():
        print(f"# left out {name}: {why}", file=sys.stderr)
    if args.out:
        handoff = write_handoff(args.out, plan)
        for name, why in handoff.layout.refused.items():
            if name not in plan.excluded:
                print(f"# left out of {handoff.layout.folder}: {name}: {why}", file=sys.stderr)
        print(f"# wrote {handoff.lora_modules}; the resolver form serves {handoff.layout.folder}:\n"
              f"# {plan.resolver_shell(handoff.layout.folder)}", file=sys.stderr)
    print(plan.shell())
    if args.run:
        os.execvp(plan.command[0], plan.command)
    return 0


class UsageError(Exception):
    """An operator's mistake, found before anything slow starts: one line, and exit status 2."""


def check_web_args(args):
    """`web`'s config and the server's access settings, after every check a typo can fail that
    needs no model: the --config file and its keys, numeric ranges, logins and keys."""
    from serve.server import access_from

    path = getattr(args, "config", None)
    try:
        config = serve_config(given(args), path)
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"--config {path}: cannot read it: {str(err).splitlines()[0]}") from err
    except (TypeError, ValueError) as err:  # they name the flag, or the file's key, at fault
        raise UsageError(str(err)) from err
    try:
        access = access_from(config.access)
    except ValueError as err:
        raise UsageError(str(err)) from err
    return config, access


def listen(access):
    """The server's socket, bound now: a port in use fails here, before the base loads."""
    from serve.server import bind

    try:
        return bind(access)
    except OSError as err:
        raise UsageError(f"cannot serve on {access.host}:{access.port}: {err.strerror or err}") from err


def cmd_web(args) -> int:
    from serve.server import run
    from serve.service import Service

    try:
        config, access = check_web_args(args)
        sock = listen(access)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with sock:
        service = Service.start(config.service)
        try:
            run(service, access, sock, config.api, config.fleet, config.ui)
        finally:
            service.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serve", description="Serve QLoRA adapters on one 4-bit base.")
    add_config_args(parser, ServeConfig, only=BASE_KEYS)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="Servable adapters, and rejected ones with their reasons.")
    chat = sub.add_parser("chat", help="One reply from one adapter ('base' for none).")
    chat.add_argument("message")
    chat.add_argument("--adapter", default="base")
    chat.add_argument("--system", default=None)
    add_config_args(chat, SamplingParams, prefix=("sampling",),
                    extra={f"sampling.{name}": spec for name, spec in SAMPLING_FIELDS.items()})
    vllm = sub.add_parser("vllm", help="Print the vLLM multi-LoRA launch command for every servable adapter.")
    vllm.add_argument("--host", default=DEFAULT_HOST)
    vllm.add_argument("--port", type=int, default=8000)
    vllm.add_argument("--run", action="store_true", help="Run it (vLLM must be installed) instead of printing it.")
    vllm.add_argument("--out", default=None, metavar="DIR",
                      help="Also write DIR/lora-modules.json and DIR/loras/<name>/ for vLLM's filesystem resolver.")
    web = sub.add_parser("web", help="The web UI and the OpenAI-compatible API on one server.")
    web.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                     help="A YAML file holding a saved ServeConfig (configs/serve.yaml: the defaults); flags override it.")
    add_config_args(web, ServeConfig, extra=ENGINE_FIELDS, skip=BASE_KEYS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return {"list": cmd_list, "chat": cmd_chat, "vllm": cmd_vllm, "web": cmd_web}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
