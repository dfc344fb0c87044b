"""Serving side (issues 3 and 4): the base loaded once, adapters chosen per request.

Not built yet. It will read adapters by name through `adapters.AdapterStore` and check them
with `adapters.check_adapter` when they are registered; it never imports `train`.
"""
