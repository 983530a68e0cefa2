"""ditto-jax: Ditto self-alignment for role-play (arXiv:2401.12474) in pure JAX."""

__version__ = "0.1.0"
