"""Adapter mixes: a request's adapters, each with its own strength, in the compact `model` spelling.

A request names one adapter (`json`), one adapter at a strength (`json*0.5`), or several at once
(`json*0.5+sentiment`): the row then adds each adapter's delta times its scale,
`Σ sᵢ·(alphaᵢ/rᵢ)·Bᵢ·Aᵢ·x`, which is what peft computes with those adapters active and each
one's scaling multiplied by its scale. The router applies it per row (serve/routing.py), so rows
with different mixes share one batch.

This module only reads and writes the spelling; the engine resolves the names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapters.store import NAME_PATTERN

JOIN = "+"
SCALE = "*"
MAX_PARTS = 8
"""The most adapters one request may mix: each is another set of products in every layer."""
MAX_SCALE = 4.0
"""|scale| beyond this pushes any adapter far outside what it was trained at; refused as a typo."""


class MixError(ValueError):
    """A spelling that names no valid mix; `param` names the field (or the part) at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.detail = param, message


@dataclass(frozen=True)
class Part:
    """One adapter of a mix: a name (or `name@version`) and its strength."""

    name: str
    scale: float = 1.0

    def spelling(self) -> str:
        return self.name if self.scale == 1.0 else f"{self.name}{SCALE}{self.scale:g}"


@dataclass(frozen=True)
class Mix:
    """The adapters a request adds to the base, in the order it named them (the first one's chat
    template and token rows are the reply's)."""

    parts: tuple[Part, ...]

    def spelling(self) -> str:
        """The canonical compact spelling: what a reply's `model` says."""
        return JOIN.join(p.spelling() for p in self.parts)

    def is_plain(self) -> bool:
        """Whether this is one adapter at its trained strength (what a plain name asks for)."""
        return len(self.parts) == 1 and self.parts[0].scale == 1.0


def is_mix(spelling: str) -> bool:
    """Whether a `model` string uses the mix spelling at all (a plain name never contains these)."""
    return JOIN in spelling or SCALE in spelling


def parse_mix(spelling: str, field: str = "model") -> Mix:
    """Read `a*0.5+b`; MixError names the part at fault and what is wrong with it."""
    parts = []
    for i, piece in enumerate(spelling.split(JOIN)):
        parts.append(_parse_part(piece.strip(), field, f"part {i + 1} ({piece!r}) of {spelling!r}"))
    names = [p.name for p in parts]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise MixError(field, f"{twice!r} appears twice in {spelling!r}; give it once, with the sum of its scales")
    if len(parts) > MAX_PARTS:
        raise MixError(field, f"{spelling!r} mixes {len(parts)} adapters; at most {MAX_PARTS} may be mixed")
    for i, part in enumerate(parts):
        _check_part(part, field, f"part {i + 1} of {spelling!r}")
    return Mix(tuple(parts))


def make_mix(parts: list[Part], field: str = "adapters") -> Mix:
    """A Mix from parts given one by one (the API's `adapters` list), checked as `parse_mix` checks."""
    if not parts:
        raise MixError(field, "names no adapter")
    if len(parts) > MAX_PARTS:
        raise MixError(field, f"mixes {len(parts)} adapters; at most {MAX_PARTS} may be mixed")
    names = [p.name for p in parts]
    for i, part in enumerate(parts):
        if names.index(part.name) != i:
            raise MixError(f"{field}[{i}].name", f"{part.name!r} appears twice; give it once, with the sum of its scales")
        _check_part(part, f"{field}[{i}]", "")
    return Mix(tuple(parts))


def _parse_part(piece: str, field: str, where: str) -> Part:
    name, sep, scale_text = piece.partition(SCALE)
    if not sep:
        return Part(name)
    try:
        scale = float(scale_text)
    except ValueError:
        raise MixError(field, f"{where}: the scale {scale_text!r} is not a number") from None
    return Part(name, scale)


def _check_part(part: Part, field: str, where: str) -> None:
    """`field`/`where`: the parameter and, in a spelling, the part's place in it."""
    prefix = f"{where}: " if where else ""
    name = part.name.split("@", 1)[0]
    if name == "base":
        raise MixError(field, f"{prefix}'base' is what every mix is added to; name only adapters in a mix")
    if not NAME_PATTERN.match(name):
        raise MixError(field, f"{prefix}{part.name!r} is not an adapter name")
    if not math.isfinite(part.scale) or abs(part.scale) > MAX_SCALE:
        raise MixError(field, f"{prefix}scale {part.scale!r} is outside [-{MAX_SCALE:g}, {MAX_SCALE:g}]")
