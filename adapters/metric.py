"""The task metric both sides score with: exact match of a reply to the reference reply,
after `normalize` (surrounding whitespace stripped)."""

from __future__ import annotations


def normalize(text: str) -> str:
    return text.strip()


def is_exact_match(reply: str, reference: str) -> bool:
    """Whether a reply counts as the reference reply."""
    return normalize(reply) == normalize(reference)
