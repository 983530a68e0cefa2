"""ditto_jax.sampling"""
