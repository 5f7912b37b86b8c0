"""Simulated Heki guests: page lists, one guest's boot and attacks, the bundled scenarios."""
