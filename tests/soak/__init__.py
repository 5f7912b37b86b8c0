"""Soak tier: many VMs under a real daemon (HEKITRACE_SOAK=1)."""
