"""ditto_jax.hf"""
