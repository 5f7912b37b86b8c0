"""Kernel tier: real BPF programs on this host (root)."""
