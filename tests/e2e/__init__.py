"""e2e tier: a real daemon process (root, BPF)."""
