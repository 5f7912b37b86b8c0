"""Kernel-facing capture: BPF loading and attach strategy, ring consumers, uevents, BTF.

Submodules are imported explicitly by their users (no work at import time).
"""
