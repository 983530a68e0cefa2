"""ditto_jax.simulation"""
