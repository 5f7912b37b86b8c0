"""Unit tier: pure Python, no root, no BPF."""
