"""Benchmarks run by ``ditto-jax bench``; each module has ``add_arguments`` and ``run``."""
