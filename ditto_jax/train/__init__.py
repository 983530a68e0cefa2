"""ditto_jax.train"""
