"""Fuzz tier: tests/fuzz/fuzzbudget.py sets each target's budget (``tests.fuzz.fuzzbudget``)."""
