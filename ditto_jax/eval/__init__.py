"""ditto_jax.eval"""
