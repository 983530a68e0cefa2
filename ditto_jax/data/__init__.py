"""ditto_jax.data"""
