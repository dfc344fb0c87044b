"""The router with other settings for a while: how the benches (and the tests) compare its paths on one model."""

from __future__ import annotations

from contextlib import contextmanager

from serve.routing import LoraRouter


@contextmanager
def restacked(router: LoraRouter, **settings):
    """`router` with `settings` (its `kernel`, `group_inputs`, `shrink`) for a while: restacked
    with them, then with what it had. Nothing else may route through it meanwhile."""
    before = {name: getattr(router, name) for name in settings}
    try:
        for name, value in settings.items():
            setattr(router, name, value)
        router.rebuild(router.keys)
        yield router
    finally:
        for name, value in before.items():
            setattr(router, name, value)
        router.rebuild(router.keys)
