"""Experiments and reports: rank sweeps, technique comparisons, the adapter x task matrix and the
talk's parameter table (`python -m experiments --help`).

A tier of its own beside bench/ and demo/: it may import adapters/, train/ and serve/; nothing
imports it (tests/test_layers.py checks both).
"""
