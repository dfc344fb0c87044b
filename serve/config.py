"""The server's one typed config: what `python -m serve web` runs with.

`ServeConfig` gathers the dataclasses each part of the server is configured by (the service and
its engine, who may use it, the API's bounds); a YAML file is a saved instance
(configs/serve.yaml holds the defaults), and `python -m serve`'s flags, generated from the
fields (`adapters.cli`), override its keys. `SamplingParams` gives `serve chat` its flags the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from adapters.cli import AT_LEAST_ONE, Range, apply_overrides, config_leaves, field_flag, from_dict, load_yaml
from serve.api import ApiLimits
from serve.management import FleetSettings
from serve.server import AccessSettings
from serve.service import ServiceConfig
from serve.ui_logic import UiSettings


@dataclass(frozen=True)
class ServeConfig:
    """Everything `python -m serve web` runs with."""

    service: ServiceConfig = field(default_factory=ServiceConfig)
    access: AccessSettings = field(default_factory=AccessSettings)
    api: ApiLimits = field(default_factory=ApiLimits)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    ui: UiSettings = field(default_factory=UiSettings)


ENGINE_FIELDS: dict[str, dict] = {
    "service.limits.max_new_tokens": {
        "flag": "--max-new-tokens-limit", "range": AT_LEAST_ONE,
        "help": "Server-side cap on a request's max new tokens: larger requests are capped, not refused."},
    "service.limits.max_batch": {
        "range": AT_LEAST_ONE, "help": "Requests decoded together in one step (the static cache's row slots)."},
}
"""Metadata for `ServeConfig` fields that serve/engine.py's dataclasses (`ServeLimits`) declare
without any. `max_new_tokens` keeps its flag `--max-new-tokens-limit`: in `serve chat`,
`--max-new-tokens` is a request's own budget, which this caps."""

SAMPLING_FIELDS: dict[str, dict] = {
    "temperature": {"help": "Sampling temperature; 0 decodes greedily."},
    "top_p": {"help": "Nucleus sampling: draw from the smallest set of tokens whose probabilities reach this."},
    "top_k": {"help": "Draw from the k likeliest tokens only (0: no limit)."},
    "max_new_tokens": {"help": "Most tokens in the reply."},
    "seed": {"help": "Seeded sampling draws from the request's own generator: the same seed, the same reply."},
    "stop": {"action": "append", "metavar": "TEXT", "help": "The reply ends before this string; repeat for several."},
}
"""`serve chat`'s help for `SamplingParams` (serve/engine.py), whose fields carry no metadata."""


def serve_config(flags: Mapping[str, Any], path: str | Path | None = None) -> ServeConfig:
    """The defaults, then the YAML file at `path` (a saved ServeConfig), then `flags` ({dotted key:
    value}, as `adapters.cli.add_config_args` parses them). ValueError names what is wrong."""
    data = load_yaml(path) if path is not None else {}
    values = apply_overrides(data, flags)
    problem = out_of_range(values)
    if problem:
        raise ValueError(problem)
    return from_dict(ServeConfig, values)


def out_of_range(values: Mapping) -> str | None:
    """The first number in `values` (a ServeConfig as nested dicts) outside its field's Range, said
    in one line naming its flag; None when all are in range (a missing one takes its default)."""
    for path, f in config_leaves(ServeConfig):
        spec = {**f.metadata, **ENGINE_FIELDS.get(".".join(path), {})}
        bounds, value = spec.get("range"), _lookup(values, path)
        if bounds is None or value is None:
            continue
        flag = spec.get("flag") or field_flag(path, f)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{flag} must be a number {_bound_text(bounds)}, got {value!r}"
        if not bounds.holds(value):
            return f"{flag} must be {_bound_text(bounds)}, got {value}"
    return None


def _lookup(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _bound_text(bounds: Range) -> str:
    closed = not bounds.low_open and (bounds.high is None or not bounds.high_open)
    if not closed or bounds.low is None:
        return bounds.text
    return f"at least {bounds.low}" if bounds.high is None else f"between {bounds.low} and {bounds.high}"
