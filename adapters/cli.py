"""Typed dataclass configs on the command line, shared by train/ and serve/.

A config is a dataclass of fields made with `opt` (their help text doubles as documentation),
nested dataclasses for its sections. `add_config_args` builds argparse flags from the fields
(a flag is named after its field: `max_queue` is `--max-queue`); a YAML file is a saved instance
(`load_yaml`); the flags given override its keys (`apply_overrides`); `from_dict` builds the
dataclasses, naming any key they do not have.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml


def opt(default, help: str, flag: str | None = None, aliases: tuple[str, ...] = (), **extra):
    """A config field whose help text doubles as its documentation and CLI help.

    flag: the flag's name where it is not the field's; aliases: other names that set it too (for a
    bool, a `--no-...` alias sets it False); extra: argparse's `nargs`, `action`, `choices` or
    `metavar`, or `range`, the Range that `check_numbers` holds a number to.
    """
    meta = {"help": help, **({"flag": flag} if flag else {}), **({"aliases": tuple(aliases)} if aliases else {}), **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# -- numbers and their ranges ---------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """The interval a numeric setting must lie in; `text` is how an error states it."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """True: `low` itself is excluded."""
    high_open: bool = True
    """True: `high` itself is excluded."""

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    @property
    def text(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_plain(self.low)}"
        return f"in {'(' if self.low_open else '['}{_plain(self.low)}, {_plain(self.high)}{')' if self.high_open else ']'}"


def _plain(bound: float | None) -> str:
    return str(int(bound)) if bound is not None and float(bound).is_integer() else str(bound)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)
"""[0, 1)."""
OPEN_UNIT = Range(0, 1, low_open=True)
"""(0, 1)."""
AT_LEAST_ONE = Range(1)
"""For counts and sizes: >= 1."""
SEED = Range(0, 2**32 - 1, high_open=False)
"""What numpy's seed accepts (transformers' set_seed seeds numpy too)."""


def check_numbers(settings, section: str) -> None:
    """Check every int or float field of a config dataclass against the Range in its metadata.

    ValueError names the field and the value: a float must be a finite number (NaN slips past
    any `<=`, and inf or NaN settings train to NaN weights), an int a true int (not a bool).
    A numeric string is read as a float first: YAML 1.1 reads `2e-4` (no dot) as a string.
    """
    for f in fields(settings):
        bounds = f.metadata.get("range")
        value = getattr(settings, f.name)
        if bounds is None or value is None:
            continue
        where = f"{section}.{f.name}" if section else f.name
        if str(f.type).startswith("float"):
            setattr(settings, f.name, _check_float(where, value, bounds))
        else:
            _check_int(where, value, bounds)


def _check_float(where: str, value, bounds: Range) -> float | int:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number {bounds.text}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number {bounds.text}, got {value!r} ({type(value).__name__})")
    if not _finite(value) or not bounds.holds(value):
        raise ValueError(f"{where} must be {bounds.text} and finite, got {value}")
    return value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float (YAML reads `1` followed by 400 zeros as one)
        return False


def _check_int(where: str, value, bounds: Range) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer {bounds.text}, got {value!r} ({type(value).__name__})")
    if not bounds.holds(value):
        raise ValueError(f"{where} must be {bounds.text}, got {value}")


# -- the fields of a nested config ----------------------------------------------------------

def _section_type(f) -> type | None:
    """The dataclass a field holds as a section (its default factory makes one), else None."""
    kind = f.default_factory() if f.default_factory is not MISSING else None
    return type(kind) if is_dataclass(kind) else None


def config_leaves(cls, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, field) for every scalar field of a nested config dataclass."""
    for f in fields(cls):
        section = _section_type(f)
        if section is not None:
            yield from config_leaves(section, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f


def field_flag(path: tuple[str, ...], f) -> str:
    """A field's flag: its metadata's `flag`, else `--` and the field's name with dashes."""
    return f.metadata.get("flag") or "--" + path[-1].replace("_", "-")


def _scalar_type(annotation: str):
    text = str(annotation)
    if text.startswith("int"):
        return int
    if text.startswith("float"):
        return float
    return str


def _is_bool(f) -> bool:
    return f.type in ("bool", bool, "bool | None")  # None: decided where it applies (see its help)


# -- argparse from the fields --------------------------------------------------------------

ARGPARSE_KEYS = ("nargs", "action", "choices", "metavar")
"""Metadata keys handed to argparse as they are."""


def add_config_args(parser, cls, prefix: tuple[str, ...] = (), flag_of: Callable = field_flag,
                    extra: Mapping[str, dict] | None = None, skip: tuple[str, ...] = (),
                    only: tuple[str, ...] | None = None) -> None:
    """A flag for every scalar field of `cls` (nested sections included), whose dest is the
    field's dotted path (`prefix` first) and which is left out of the namespace unless given.

    flag_of(path, field): the flag's name; extra: per dotted path, metadata for fields that carry
    none of their own, over theirs (help, flag, aliases, range, argparse's keys); skip, only:
    dotted paths (or sections) to leave out, or to take alone. A bool takes `--name/--no-name`.
    """
    for path, f in config_leaves(cls, prefix):
        dest = ".".join(path)
        if _under(dest, skip) or (only is not None and not _under(dest, only)):
            continue
        spec = {**f.metadata, **(extra or {}).get(dest, {})}
        flag = spec.get("flag") or flag_of(path, f)
        aliases = spec.get("aliases", ())
        help_text = spec.get("help", "")
        if _is_bool(f):
            positive = [a for a in aliases if not a.startswith("--no-")]
            parser.add_argument(flag, *positive, dest=dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            for negative in (a for a in aliases if a.startswith("--no-")):
                parser.add_argument(negative, dest=dest, action="store_false", default=argparse.SUPPRESS,
                                    help=f"The same as --no-{flag.removeprefix('--')}.")
            continue
        options = {key: spec[key] for key in ARGPARSE_KEYS if key in spec}
        if "choices" not in options:  # with choices, argparse shows them
            options.setdefault("metavar", path[-1].upper())
        if options.get("action") not in ("append", "store_true", "store_false"):
            options["type"] = _scalar_type(f.type)
        parser.add_argument(flag, *aliases, dest=dest, default=argparse.SUPPRESS, help=help_text, **options)


def _under(dest: str, sections: tuple[str, ...]) -> bool:
    return any(dest == s or dest.startswith(s + ".") for s in sections)


def given(args: argparse.Namespace | Mapping, prefix: str = "") -> dict[str, Any]:
    """The config values a parsed command line holds: its dotted dests (under `prefix`)."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: v for k, v in values.items() if "." in k and k.startswith(prefix)}


# -- a YAML file as a saved instance, flags over it ----------------------------------------

def load_yaml(path: str | Path) -> dict:
    """The mapping a YAML config file holds (an empty file: none). ValueError for anything else."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of keys, not a {type(data).__name__}")
    return data


def load_yamls(paths: list[str | Path]) -> dict:
    """The mappings of several YAML config files, each one's keys over the ones before it, section
    by section: a task's recipe can hold only what differs from a shared one."""
    merged: dict = {}
    for path in paths:
        _merge(merged, load_yaml(path))
    return merged


def _merge(tree: dict, over: Mapping) -> None:
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value


def apply_overrides(tree: dict, dotted: Mapping[str, Any]) -> dict:
    """`tree` (a config as nested dicts) with each `section.key` of `dotted` set over it."""
    for key, value in dotted.items():
        _set(tree, key.split("."), value)
    return tree


def _set(tree: dict, path: list[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def from_dict(cls, data: Mapping, section: str = ""):
    """`cls` built from a nested mapping: each section (a field that holds a dataclass) from its
    own mapping (absent: built from no keys), lists turned into tuples for tuple fields.
    ValueError names keys `cls` does not have, and their section."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config section {section!r} must be a mapping of keys, got {data!r}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown keys in config section {section!r}: {unknown}" if section
                         else f"unknown config keys: {unknown}")
    kwargs = dict(data)
    for name, f in names.items():
        kind = _section_type(f)
        if kind is not None:
            kwargs[name] = from_dict(kind, kwargs.get(name) or {}, f"{section}.{name}" if section else name)
        elif name in kwargs and isinstance(kwargs[name], list) and str(f.type).startswith("tuple"):
            kwargs[name] = tuple(kwargs[name])
    return cls(**kwargs)
