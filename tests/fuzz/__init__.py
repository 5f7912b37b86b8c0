"""Fuzz tier: hypothesis targets with per-target budgets (fuzzbudget.py)."""
