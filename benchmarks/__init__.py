"""Benchmarks, simulations and the diffusers reference runners (not part of the installed package)."""
